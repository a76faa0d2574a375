# Every target sets up .venv on first use with only what it needs; `make test` is what CI runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
PROMPT ?= a red circle in the top left on a blue background

.PHONY: setup test test-fast demo demo-weights demo-lcm-weights bench clean app

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per extra: .installed-runtime is the package alone (what `make demo` needs: no PyTorch),
# .installed-test / -train / -app add that extra.
$(VENV)/.installed-%: setup.py | $(PY)
	$(PY) -m pip install --quiet -e ".$(if $(filter runtime,$*),,[$*])"
	touch $@

.PRECIOUS: $(VENV)/.installed-%

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The embedded demo cascade (cascade_jax/demo/weights) unless WEIGHTS=DIR is given; PROMPT="..." to change it.
demo: $(VENV)/.installed-runtime
	$(PY) sample/generate.py text2img --prompt "$(PROMPT)" $(if $(WEIGHTS),--weights $(WEIGHTS) $(if $(filter demo demo-lcm,$(WEIGHTS)),,--height 1024 --width 1024)) \
		--preview --out demo_out

# Rebuild the demo cascade from scratch with the project's trainers (under an hour on 2 CPU cores).
demo-weights: $(VENV)/.installed-train
	$(PY) train/demo.py

# The web app on http://127.0.0.1:7860: the demo weights, or WEIGHTS=DIR; more flags in APP_ARGS (e.g. --random tiny).
app: $(VENV)/.installed-app
	$(PY) sample/app.py $(if $(WEIGHTS),--weights $(WEIGHTS)) $(APP_ARGS)

# Distil the demo's Stage C into the demo-lcm LCM-LoRA (--weights demo-lcm): 20 min measured on a loaded 2-core
# machine, of which under 5 min of CPU time (docs/lcm.md).
demo-lcm-weights: $(VENV)/.installed-train
	$(PY) train/demo_lcm.py

bench: $(STAMP)
	$(PY) benchmarks/run_cpu.py

clean:
	rm -rf $(VENV) demo_out demo_build .pytest_cache
