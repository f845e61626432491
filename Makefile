# `make demo`: install into .venv and pretrain a trunk with the default recipe (contrastive views) on the embedded MNIST-5k.
# `make test`: install into .venv and run the test suite.
# `make test-threads`: the numerical tests again with one OpenMP/Eigen thread (bounds hold for any count).
# `make test-no-kernels`: the suite with auxtl's CPU kernels off (AUXTL_CPU_KERNELS=0: plain XLA, nothing compiled).
PYTHON ?= python
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.auxtl-installed

.PHONY: demo test test-threads test-no-kernels bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 12), f"auxtl needs Python >= 3.12, $(PYTHON) is {sys.version.split()[0]}"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,onednn]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/auxtl pretrain --data mnist5k --out runs/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

NUMERICAL_TESTS := tests/test_winograd.py tests/test_onednn.py tests/test_conv.py \
	tests/test_native_build.py tests/test_task_masked_inpainting.py tests/test_seeds.py

test-no-kernels: $(STAMP)
	AUXTL_CPU_KERNELS=0 $(BIN)/python -m pytest -q

test-threads: $(STAMP)
	OMP_NUM_THREADS=1 XLA_FLAGS="$(XLA_FLAGS) --xla_cpu_multi_thread_eigen=false" \
		$(BIN)/python -m pytest -q $(NUMERICAL_TESTS)

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs build *.egg-info
