"""Built-in auxiliary tasks, one module each, written against auxtl's public API only.

auxtl's registry imports every module in this package on first use.
"""
