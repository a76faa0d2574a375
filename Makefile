# Every target sets up .venv on first use; `make test` is what CI runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo bench clean app

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) sample/generate.py text2img --prompt "a lighthouse on a cliff at sunset" --height 512 --width 512 \
		$(if $(WEIGHTS),--weights $(WEIGHTS),--random tiny) --preview --out demo_out

# The web app on http://127.0.0.1:7860: the demo weights, or WEIGHTS=DIR; more flags in APP_ARGS (e.g. --random tiny).
app: $(STAMP)
	$(PY) sample/app.py $(if $(WEIGHTS),--weights $(WEIGHTS)) $(APP_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_cpu.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
