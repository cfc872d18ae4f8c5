# The README's two commands: `make demo` and `make test`. Each creates or reuses .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= demo

.PHONY: demo test test-all install clean-demo

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rts-tf demo-data $(DEMO)/data --seed 0
	$(VENV)/bin/rts-tf build-records --config experiments/demo-records.yaml --out records/demo
	$(VENV)/bin/rts-tf inspect records/demo --previews $(DEMO)/previews --tensorboard $(DEMO)/tensorboard/records

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

clean-demo:
	rm -rf $(DEMO) records/demo
