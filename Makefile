# Two entry points, both reusing one virtual environment in .venv (a re-run does not reinstall):
#   make demo   install, then train the nano model on the built-in synthetic data set (CPU)
#   make test   install (with test extras), then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.remax-installed

.PHONY: demo test install

install: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps panopticapi-lite==0.2.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/remax train

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15
