# make test: the lint and the whole suite; make check: the lint and the fast subset (under 3
# minutes); make test-compat: the fast subset on the oldest supported torch; make demo: train
# FractalNet on the embedded digits data; make bench: kernel and model benchmarks; make audit:
# compile every kernel for sm_80/sm_90.
#
# Where $(PYTHON) already has everything the suite imports (a GPU machine's image: torch, triton,
# pytest, hypothesis, no network), the targets run from the tree with that Python as it is:
# nothing is created or downloaded. Elsewhere they create .venv on first use and reuse it.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= 2.13.0
SUITE_IMPORTS := torch, triton, numpy, tqdm, matplotlib, sklearn, PIL, pytest, pytest_benchmark, hypothesis
USE_PYTHON_AS_IS ?= $(shell $(PYTHON) -c "import $(SUITE_IMPORTS)" 2>/dev/null && echo yes)

ifeq ($(USE_PYTHON_AS_IS),yes)
PY := $(PYTHON)
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
STAMP :=
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
endif

.PHONY: test check test-compat lint demo bench audit gpu-check clean

# pip byte-compiles what it installs one file at a time; compileall does it on every core once
# everything is in (the files that do not compile on this Python, such as torch's for 3.12, are
# skipped, as pip skips them).
PIP_INSTALL = $(PY) -m pip install --no-compile
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch only when none is importable: the CPU build on disk here, the CUDA build elsewhere.
	$(PY) -c "import torch" 2>/dev/null || $(PIP_INSTALL) torch==$(TORCH)
	# A CPU torch brings no triton: pin the version the GPU machines run.
	if $(PY) -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
		$(PIP_INSTALL) triton==3.6.0; fi
	$(PIP_INSTALL) -e ".[test]"
	# pytorchcv: an independent FractalNet for the drop-in tests. Its package requires
	# torchvision, which its FractalNet does not use (and which fails beside the CPU torch).
	$(PIP_INSTALL) --no-deps pytorchcv==0.0.74
	$(PY) -m compileall -qq -j 0 $$($(PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))") || true
	touch $@

# ruff comes with .venv; a Python used as it is may lack it (the GPU machine's image does).
lint: $(STAMP)
	if $(PY) -c "import ruff" 2>/dev/null; then $(PY) -m ruff check .; else echo "ruff not installed: lint skipped"; fi

# Without a GPU, the suite runs twice, side by side (each session keeps about one core busy):
# every kernel in the Triton interpreter, and the GPU path (triton_op registration,
# torch.compile, kernel-mutation analysis) on a fake sm_90 GPU, whose output follows. The
# markers of pytest.ini place each test (tests/conftest.py): fake_gpu tests run on the fake GPU
# only, both_sessions tests in each, either_session tests (they run no Triton kernel in the
# session itself: the GPU-check dry run's phases, the CLI, the two-process training runs and
# the eager two-process synchronised BatchNorm are subprocesses of their own, the packaging and
# import checks build and import, anytime serving runs the CPU reference ops) beside the fake
# GPU's, and the rest (among them the experiments and the other training tests, which run the
# CPU reference ops, placed there to even the two sessions out) in the interpreter's. One thread
# each: two sessions of torch's default two threads on two cores ran slower side by side than one
# after the other. make check leaves out the tests marked slow.
check: SLOW := not slow and
test check: lint
	if $(PY) -c "import sys, torch; sys.exit(torch.cuda.is_available())"; then \
		log=$$(mktemp); export OMP_NUM_THREADS=1; \
		FRACTAL_KERNELS_FAKE_GPU=1 $(PY) -m pytest -q -p no:cacheprovider \
			-m "$(SLOW) (fake_gpu or both_sessions or either_session)" tests > $$log 2>&1 & fake=$$!; \
		$(PY) -m pytest -q -m "$(SLOW) not (fake_gpu or either_session)" tests; status=$$?; \
		wait $$fake; fake_status=$$?; \
		echo "--- fake GPU: the tests marked fake_gpu, both_sessions or either_session"; cat $$log; rm -f $$log; \
		exit $$((status || fake_status)); \
	else $(PY) -m pytest -q $(if $(SLOW),-m "not slow") tests; fi

# make check on the oldest supported torch, in a venv of its own: torch 2.11 from PyPI (its CUDA
# build, about 4.6 GB once, which runs on the CPU too) on Python 3.12 where one is at hand (on
# PATH or under pyenv), the GPU machines' stack.
COMPAT_VENV := .venv-compat
COMPAT_TORCH := 2.11.0
COMPAT_PYTHON ?= $(firstword $(shell python3.12 -c "import sys; print(sys.executable)" 2>/dev/null) \
	$(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(PYTHON))
test-compat:
	$(MAKE) check VENV=$(COMPAT_VENV) PYTHON=$(COMPAT_PYTHON) TORCH=$(COMPAT_TORCH) USE_PYTHON_AS_IS=no
	$(COMPAT_VENV)/bin/python -c "import sys, torch; print('make test-compat: torch', torch.__version__, 'on Python', \
		sys.version.split()[0])"

# The demo: FractalNet (3 blocks of C=3 columns, widths 32, 64, 128) on the embedded digits data;
# the Triton kernels on a GPU, the reference ops on a CPU; then each sub-network calibrated, and
# the held-out test images served within budgets (ms per image). About 2 minutes on 2 CPU cores.
DEMO_OUT ?= runs/demo
DEMO_BUDGETS ?= 0.2,0.5,1,3
demo: $(STAMP)
	$(PY) -m fractalnet train --dataset digits --widths 32,64,128 --dropout 0,0.1,0.2 --image-size 16 \
		--epochs 30 --batch-size 50 --lr 0.05 --out $(DEMO_OUT)
	$(PY) -m fractalnet anytime --checkpoint $(DEMO_OUT)/last.pt --calibrate
	$(PY) -m fractalnet anytime --checkpoint $(DEMO_OUT)/last.pt --budget-ms $(DEMO_BUDGETS)

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
	rm -rf .venv $(COMPAT_VENV) *.egg-info .pytest_cache
