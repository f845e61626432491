# `make demo`: install into .venv and pretrain a rotation trunk on the embedded MNIST-5k.
# `make test`: install into .venv and run the test suite.
PYTHON ?= python
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.auxtl-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 12), f"auxtl needs Python >= 3.12, $(PYTHON) is {sys.version.split()[0]}"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,onednn]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/auxtl pretrain --task rotation --data mnist5k --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs build *.egg-info
