# Two commands on a fresh machine (see README.md):
#   make test    set up the virtualenv and run the test suite; `make test IMAGE_TESTS=1` (what CI runs) also
#                starts a Docker engine, builds the images (deploy/local-engine.sh) and runs the tests marked `image`
#   make serve   set up, export the served artifact if missing, serve it on 127.0.0.1:8000
#
# Other targets: make setup | lint | data | pretrain | evaluate | clean

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

# `make serve`: the artifact served, and how it is exported when missing (service/README.md).
PIPELINE     ?= checkpoints/diffprompt
ARTIFACTS    ?= artifacts
EXPORT_STEPS ?= 25 5
SERVE_STEPS  ?= 5
ARTIFACT     ?= $(ARTIFACTS)/$(notdir $(PIPELINE))-$(SERVE_STEPS)steps
HOST         ?= 127.0.0.1
PORT         ?= 8000

# `make test IMAGE_TESTS=1`: also build the images and run them on a real Docker engine (tests marked `image`).
IMAGE_TESTS  ?= 0

.PHONY: setup system-tools test lint data pretrain evaluate serve clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[train,serve,cpu,dev]'
	touch $@

# Debian tools the tests drive for real (prometheus, promtool, chromium, docker-compose; with IMAGE_TESTS=1
# also docker.io and debootstrap): installed when missing and root, otherwise the tests that need them skip
# with the reason (the image tests fail instead: IMAGE_TESTS=1 asks for them).
system-tools:
	@bash scripts/ensure_system_tools.sh $(if $(filter 1,$(IMAGE_TESTS)),--image)

ifeq ($(IMAGE_TESTS),1)
test: setup system-tools
	PYTHON=$(PY) bash deploy/local-engine.sh run $(PY) -m pytest -q --image-tests
else
test: setup system-tools
	$(PY) -m pytest -q -m "not image"
endif

lint: setup
	$(VENV)/bin/ruff check .

data: setup
	$(VENV)/bin/diffprompt data write --split all --out data/synthetic

# Writes runs/foundation; `diffprompt pretrain --output checkpoints/foundation --overwrite` replaces the committed one.
pretrain: setup
	$(VENV)/bin/diffprompt pretrain

evaluate: setup
	$(VENV)/bin/diffprompt evaluate --checkpoint checkpoints/foundation --split heldout val testA testB

# The export step needs torch (the train extra); the server itself never imports it.
serve: setup $(ARTIFACT)/manifest.json
	$(VENV)/bin/diffprompt serve --artifact $(ARTIFACT) --host $(HOST) --port $(PORT)

# Re-exported when the pipeline's no-match calibration for the served step count is newer.
$(ARTIFACT)/manifest.json: $(wildcard $(PIPELINE)/no_match-$(SERVE_STEPS)steps.json) | setup
	@test -d $(PIPELINE) || { echo "$(PIPELINE) is missing: train it first (diffprompt train-prompts), or set PIPELINE=..." >&2; exit 1; }
	$(VENV)/bin/diffprompt export --pipeline $(PIPELINE) --steps $(EXPORT_STEPS) --out $(ARTIFACTS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
