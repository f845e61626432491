"""Import trunks from other frameworks (PyTorch, safetensors, Keras, orbax/Flax, npz) and
export auxtl trunks to them. See `import_trunk` and `export_trunk`."""
