# moe-lab: the two commands of the README.
#   make lab   - create .venv if needed, install the course, open JupyterLab on your working copies
#                of the notebooks (notebooks/workspace/, never the tracked files: see moe_lab/commands/lab.py)
#   make test  - the same set-up, then the unit tests and every notebook (nbval)
#   make exercises - regenerate the learner notebooks notebooks/exercises/*.ipynb from the solutions
#
# Variables you may set on the command line:
#   TORCH="torch==2.13.0"   which torch to install when .venv has none. Examples:
#                           TORCH="torch --index-url https://download.pytorch.org/whl/cpu"  (CPU laptop)
#                           TORCH="torch"                                                 (CUDA build)
#   TRITON="triton==3.8.0"  which triton (Linux only; ignored elsewhere)
#   LAB_ARGS="--no-browser --port 8899"   extra JupyterLab flags for make lab
#   PYTEST_ARGS="-k router"               extra pytest flags for make test
#   MOE_LAB_FAST=1          make test runs the notebooks with the smallest (CI) presets; set
#                           MOE_LAB_FAST=0 to run them with the CPU/GPU presets instead.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRITON ?= triton==3.8.0
LAB_ARGS ?=
PYTEST_ARGS ?=
MOE_LAB_FAST ?= 1

BIN := $(VENV)/bin
STAMP := $(VENV)/.moe-lab-installed
UNAME := $(shell uname -s)

.PHONY: lab test setup notebooks exercises clean help

help:
	@sed -n '2,15p' Makefile

setup: $(STAMP)

# The stamp is re-made only when the package's requirements change, so a second run is instant.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@# torch first, and only when missing: never swap a torch the user chose for another build.
	@$(BIN)/python -c "import torch" 2>/dev/null || { echo "installing $(TORCH)"; $(BIN)/python -m pip install -q $(TORCH); }
ifeq ($(UNAME),Linux)
	@$(BIN)/python -c "import triton" 2>/dev/null || { echo "installing $(TRITON)"; $(BIN)/python -m pip install -q $(TRITON); }
endif
	@# setuptools announces every editable install with a boxed "Editable installation" warning (a folder
	@# named moe_lab in your working directory could shadow the package): harmless here, so it is filtered.
	@PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q -e ".[lab,dev,hub]"
	@touch $(STAMP)
	@$(BIN)/python -c "import moe_lab, torch; print('moe-lab', moe_lab.__version__, '| torch', torch.__version__)"

# Kernels get OMP_WAIT_POLICY=PASSIVE (two notebooks computing at once do not stall each other), the
# wait policy `import moe_lab` also sets; the thread count is runtime.setup()'s (one torch thread in
# modes cpu and ci on a CPU; MOE_LAB_THREADS=N to change: see moe_lab/core/runtime.py, thread_policy).
lab: setup
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/python -m moe_lab lab $(LAB_ARGS)

test: setup
	MPLBACKEND=Agg MOE_LAB_FAST=$(MOE_LAB_FAST) OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/python -m pytest -v -p no:cacheprovider \
		--nbval-lax --nbval-current-env --nbval-cell-timeout=900 \
		tests notebooks --ignore=notebooks/exercises $(PYTEST_ARGS)

# Regenerate every notebook's .ipynb (no outputs) from its py:percent source, and the learner versions.
notebooks: setup
	@for f in notebooks/[0-9][0-9]_*.py; do $(BIN)/jupytext --quiet --to ipynb "$$f"; done
	@$(BIN)/python -m moe_lab exercises

# Regenerate the learner versions (solution regions replaced by "your turn" stubs); the tests fail
# when the committed ones differ from what this writes.
exercises: setup
	@$(BIN)/python -m moe_lab exercises

clean:
	rm -rf $(VENV) .pytest_cache runs
