# One command each: `make serve` runs the backend, `make test` runs every test.
# Both create .venv and install what they need (Python packages from requirements.txt,
# redis-server from Debian's packages).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install redis labelstudio test test-fast serve bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools  # setuptools: the editable install below (venvs of Python >= 3.12 lack it)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# redis-server for the RQ integration tests (Debian package)
redis:
	@command -v redis-server >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# Label Studio 1.23.2 in its own virtualenv, with a migrated template database, for the end-to-end test
labelstudio:
	PYTHON=$(PYTHON) bash tests/e2e/install_labelstudio.sh .venv-labelstudio

test: install redis labelstudio
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not e2e and not slow"

serve: install
	$(VENV)/bin/samlight-serve

bench: install
	$(VENV)/bin/samlight bench

clean:
	rm -rf $(VENV) .venv-labelstudio .pytest_cache
