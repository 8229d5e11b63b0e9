# The two commands of the README:
#   make course   set up .venv and run every notebook on the tiny CPU defaults (executed copies in runs/)
#   make test     set up .venv and run the whole test suite (pytest + nbval on the notebooks)
# and, for maintainers:
#   make lint        ruff (lint + format check) and notebooks stripped of outputs (nbstripout --verify)
#   make test-floor  a second venv, .venv-floor, with every dependency at its floor in pyproject.toml
#   make test-gpu    the `gpu`-marked tests (a 9B-width model on CUDA); needs a CUDA torch in .venv
#
# GPU users: install the CUDA torch of your choice into .venv first, or override TORCH_SPEC, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
# The default pins the release; on macOS and Windows PyPI's wheel is the CPU build, on Linux it is the CUDA build
# (multi-GB) unless pip also sees the PyTorch CPU index, e.g. TORCH_SPEC="torch==2.13.0 --extra-index-url
# https://download.pytorch.org/whl/cpu" (pip prefers 2.13.0+cpu). `make wheelhouse` adds that index itself.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
FLOOR_VENV  ?= .venv-floor
FLOOR_STAMP := $(FLOOR_VENV)/.installed
RUN_DIR     ?= runs/$(shell date +%Y%m%d-%H%M%S)
NOTEBOOKS   := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: setup course test test-floor test-gpu lint clean-venv wheelhouse

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	@echo "building DeepSpeed's CPU ops into the JIT cache (once per machine: ~3 minutes on 2 cores)"
	$(BIN)/python -c "import cogagent_nb.train.distributed as d; print('built:', *d.build_cpu_ops())" \
	  || echo "warning: DeepSpeed's CPU ops were not built now; the first ZeRO run on a CPU compiles them"
	touch $(STAMP)

course: $(STAMP)
	$(BIN)/cogagent-nb course --out $(RUN_DIR)

# nbval runs each lesson as saved, except cells tagged `nbval-skip`: lesson 07's 4-minute learning run, which
# `make course` runs in full and tests/test_notebooks_own_data.py runs short (the suite stays under 20 minutes).
test: $(STAMP)
	$(BIN)/python -m pytest --nbval-lax tests notebooks

# The floors: .ci/floor_constraints.py pins each `>=X` of pyproject.toml to `==X`. torch stays at TORCH_SPEC
# (older torch on PyPI comes only as multi-GB CUDA wheels; pyproject.toml says so beside its floor).
# Only what tests/ needs is installed (no Jupyter stack, no DeepSpeed): the notebooks and the `slow` tests
# (DeepSpeed, multi-process runs, every lesson on other data, the browser) run in `make test`.
# Test modules of the course runner (Jupyter stack) and of DeepSpeed import those at collection time.
FLOOR_IGNORE := --ignore=tests/test_course.py --ignore=tests/test_notebooks_own_data.py \
                --ignore=tests/test_distributed_deepspeed.py

$(FLOOR_STAMP): pyproject.toml Makefile .ci/floor_constraints.py
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(FLOOR_VENV)/bin/python .ci/floor_constraints.py --keep torch > $(FLOOR_VENV)/floor-constraints.txt
	$(FLOOR_VENV)/bin/python -m pip install --quiet -c $(FLOOR_VENV)/floor-constraints.txt -e . pytest hypothesis
	touch $(FLOOR_STAMP)

test-floor: $(FLOOR_STAMP)
	$(FLOOR_VENV)/bin/python -m pip list --format=freeze | grep -iE "^(torch|transformers|peft|accelerate)=="
	$(FLOOR_VENV)/bin/python -m pytest -q -m "not slow" $(FLOOR_IGNORE) tests

test-gpu: $(STAMP)
	$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: torch sees no CUDA device (install a CUDA torch into $(VENV), see TORCH_SPEC)')"
	$(BIN)/python -m pytest -m gpu -rs tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/nbstripout --verify --keep-id $(NOTEBOOKS)

clean-venv:
	rm -rf $(VENV) $(FLOOR_VENV)

# For a room without internet: every wheel the course needs (CPU torch included) into wheelhouse/ (docs/WORKSHOP.md).
# Copy the repository with wheelhouse/ to each laptop, then:
#   python3 -m venv .venv && .venv/bin/pip install --no-index --find-links wheelhouse -e ".[dev]"
# torch: on Linux, PyPI's torch wheel is the CUDA build and brings ~3 GB of nvidia-* wheels. The PyTorch CPU index
# serves the same release as X+cpu, which pip prefers (a local version sorts above the plain one), so torch is
# fetched alone with that index added, checked (scripts/wheelhouse_torch.py stops on a CUDA build) and then
# pinned by file while everything else comes from the usual registries.
# BUILD_REQUIRES: pyproject.toml's [build-system] requires; the offline `pip install -e .` builds the package.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
BUILD_REQUIRES  := "setuptools>=77" wheel

wheelhouse:   # needs only pip (not `make setup`, whose torch would be the CUDA build on Linux)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	rm -rf wheelhouse
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir wheelhouse --extra-index-url $(TORCH_CPU_INDEX) $(TORCH_SPEC)
	torch_wheel=$$($(BIN)/python scripts/wheelhouse_torch.py wheelhouse) && \
	$(BIN)/python -m pip wheel --quiet --wheel-dir wheelhouse "$$torch_wheel" $(BUILD_REQUIRES) ".[dev]"
	rm -f wheelhouse/cogagent_nb-*.whl   # the laptops install the package from the copied repository (-e .)
	@echo "wheelhouse/: $$(ls wheelhouse | wc -l) wheels, $$(du -sh wheelhouse | cut -f1)"
