# One command each: `make serve` runs the backend, `make test` runs every test.
# Both create .venv and install what they need (Python packages from requirements.txt,
# redis-server from Debian's packages).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install redis chromium labelstudio label-studio test test-fast serve bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools  # setuptools: the editable install below (venvs of Python >= 3.12 lack it)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# redis-server for the RQ integration tests, chromium for the browser test (Debian packages; waits for apt locks)
redis:
	bash tools/apt-install.sh redis-server

chromium:
	bash tools/apt-install.sh chromium

# Label Studio 1.23.2 in its own virtualenv, with a migrated template database, for the end-to-end tests
labelstudio:
	PYTHON=$(PYTHON) bash tests/e2e/install_labelstudio.sh .venv-labelstudio

# a local Label Studio 1.23.2 for a trial, on http://localhost:8080, allowed to reach a backend on this machine
LS_PORT ?= 8080
label-studio: labelstudio
	ML_BLOCK_LOCAL_IP=false SSRF_PROTECTION_ENABLED=false LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true \
	  .venv-labelstudio/bin/label-studio start --port $(LS_PORT)

test: install redis chromium labelstudio
	$(PY) -m pytest

test-fast: install redis
	$(PY) -m pytest -m "not e2e and not slow"

serve: install
	$(VENV)/bin/samlight-serve

bench: install
	$(VENV)/bin/samlight bench

clean:
	rm -rf $(VENV) .venv-labelstudio .pytest_cache
