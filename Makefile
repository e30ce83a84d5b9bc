# Two commands on a fresh machine (see README.md):
#   make test    set up the virtualenv and run the test suite (what CI runs)
#
# Other targets: make setup | lint | data | pretrain | evaluate | clean

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: setup test lint data pretrain evaluate clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[train,serve,dev]'
	touch $@

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

data: setup
	$(VENV)/bin/diffprompt data write --split all --out data/synthetic

pretrain: setup
	$(VENV)/bin/diffprompt pretrain --output checkpoints/foundation

evaluate: setup
	$(VENV)/bin/diffprompt evaluate --checkpoint checkpoints/foundation --split heldout val testA testB

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
