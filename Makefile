# Two entry points, both reusing one virtual environment in .venv (a re-run does not reinstall):
#   make demo   install, then train the nano model on the built-in synthetic data set (CPU)
#   make test   install (with test extras), then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.remax-installed

.PHONY: demo test install browser

install: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps panopticapi-lite==0.2.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/remax train

# The web demo's browser test drives Debian's Chromium (playwright cannot download its own browser offline): install
# it when absent and apt-get exists (CI runs as root on Debian 12); elsewhere the test says why it is skipped.
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian chromium for the browser test"; \
		apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
		|| echo "warning: could not install chromium; the browser test will be skipped"; \
	fi

test: $(STAMP) browser
	$(PY) -m pytest -q -n 2 --durations=15
