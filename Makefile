# The two commands of the README:
#   make course   set up .venv and run every notebook on the tiny CPU defaults (executed copies in runs/)
#   make test     set up .venv and run the whole test suite (pytest + nbval on the notebooks)
#
# GPU users: install the CUDA torch of your choice into .venv first, or override TORCH_SPEC, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
# The default pins the CPU build so that a laptop or CI never pulls a multi-GB CUDA wheel.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
RUN_DIR     ?= runs/$(shell date +%Y%m%d-%H%M%S)
NOTEBOOKS   := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: setup course test lint clean-venv wheelhouse

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $(STAMP)

course: $(STAMP)
	$(BIN)/cogagent-nb course --out $(RUN_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest --nbval-lax tests notebooks

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)

# For a room without internet: every wheel the course needs (CPU torch included) into wheelhouse/.
# Copy the repository with wheelhouse/ to each laptop, then:
#   python3 -m venv .venv && .venv/bin/pip install --no-index --find-links wheelhouse -e ".[dev]"
wheelhouse: $(STAMP)
	$(BIN)/python -m pip wheel --quiet --wheel-dir wheelhouse $(TORCH_SPEC) ".[dev]"
