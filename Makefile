# Every target sets up its own virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo compare test test-all bench bench-quick lint tiny-lm clean

install: $(STAMP)

# torch is pinned through constraints.txt so that CPU machines do not pull a CUDA build.
$(STAMP): setup.cfg constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train.py fit --config configs/demo.yaml

# the synthetic comparison of MTSAEs, baselines and ablations (reports/demo/report.md)
compare: $(STAMP)
	$(PY) compare.py --config configs/compare/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# every benchmark, one table of ratios (bench/RESULTS.md: the last full run); bench-quick: a smoke run
bench: $(STAMP)
	$(PY) bench/run_all.py

bench-quick: $(STAMP)
	$(PY) bench/run_all.py --quick

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

tiny-lm: $(STAMP)
	$(PY) -m mtsae.tiny_lm --out artifacts/tiny_lm

clean:
	rm -rf runs cache lightning_logs
