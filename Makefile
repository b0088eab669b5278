# Two commands do all the set-up themselves on a fresh machine:
#   make simulate   -> create .venv, install, run `medseg simulate` (default scenario)
#   make test       -> create .venv, install, run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install simulate quick test benchmark clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

simulate: $(STAMP)
	$(VENV)/bin/medseg simulate --baselines

quick: $(STAMP)
	$(VENV)/bin/medseg simulate --quick

test: $(STAMP)
	$(VENV)/bin/pytest -q

benchmark: $(STAMP)
	$(PY) benchmarks/dp_step.py
	$(PY) benchmarks/federation.py

clean:
	rm -rf runs .pytest_cache
