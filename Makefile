# make test: the lint and the whole suite; make demo: train FractalNet on the embedded digits data;
# make bench: kernel and model benchmarks; make audit: compile every kernel for sm_80/sm_90.
# Each creates .venv on first use; later runs reuse it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench audit gpu-check clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch only when none is importable: the CPU build on disk here, the CUDA build elsewhere.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	# A CPU torch brings no triton: pin the version the GPU machines run.
	if $(PY) -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
		$(PY) -m pip install triton==3.6.0; fi
	$(PY) -m pip install -e ".[test]"
	# pytorchcv: an independent FractalNet for the drop-in tests. Its package requires
	# torchvision, which its FractalNet does not use (and which fails beside the CPU torch).
	$(PY) -m pip install --no-deps pytorchcv==0.0.74
	touch $(STAMP)

# Without a GPU, the suite runs twice, side by side (each session keeps about one core busy):
# every kernel in the Triton interpreter, and the GPU path (triton_op registration,
# torch.compile, kernel-mutation analysis) on a fake sm_90 GPU, whose output follows. Tests that
# run no Triton kernel in the session itself (the GPU-check dry run's phases are subprocesses of
# their own; the experiments train on the CPU reference ops) go with the fake GPU's session,
# which the interpreter's would otherwise outlast by minutes.
FAKE_GPU_TESTS := tests/test_gpu_path.py tests/test_ops.py tests/test_model.py
EITHER_SESSION_TESTS := tests/test_gpu_check.py tests/test_experiments.py
test: $(STAMP)
	$(PY) -m ruff check .
	if $(PY) -c "import sys, torch; sys.exit(torch.cuda.is_available())"; then \
		log=$$(mktemp); \
		FRACTAL_KERNELS_FAKE_GPU=1 $(PY) -m pytest -q -p no:cacheprovider $(FAKE_GPU_TESTS) $(EITHER_SESSION_TESTS) \
			> $$log 2>&1 & fake=$$!; \
		$(PY) -m pytest -q $(foreach t,$(EITHER_SESSION_TESTS),--ignore=$(t)) tests; status=$$?; \
		wait $$fake; fake_status=$$?; \
		echo "--- fake GPU: $(FAKE_GPU_TESTS) $(EITHER_SESSION_TESTS)"; cat $$log; rm -f $$log; \
		exit $$((status || fake_status)); \
	else $(PY) -m pytest -q tests; fi

# The demo: FractalNet (3 blocks of C=3 columns, widths 32, 64, 128) on the embedded digits data;
# the Triton kernels on a GPU, the reference ops on a CPU. About 1.5 minutes on 2 CPU cores.
DEMO_OUT ?= runs/demo
demo: $(STAMP)
	$(PY) -m fractalnet.train --dataset digits --widths 32,64,128 --dropout 0,0.1,0.2 --image-size 16 \
		--epochs 30 --batch-size 50 --lr 0.05 --out $(DEMO_OUT)

bench: $(STAMP)
	$(PY) -m benchmarks

audit: $(STAMP)
	$(PY) -m fractal_kernels.audit

# On a GPU machine, from the tree with its own Python (no .venv, nothing installed): correctness on
# the compiled kernels, then the benchmarks, each phase under its own limit, 8 minutes in all.
GPU_CHECK_OUT ?= gpu-check
gpu-check:
	PYTHONPATH=. $(PYTHON) -m benchmarks.gpu_check --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
