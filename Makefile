# make stage1 | stage2 | eval | test | bench, with MODEL=, DATA=, PRESET= passed through. `make eval` takes the
# budgets and tool limits the adapter was trained with (its config.json); ARGS=--global-tokens=1024 overrides.
# Every target runs `setup` first, so a fresh clone needs nothing else.
PY      := .venv/bin/python
MODEL   ?= tiny
PRESET  ?= tiny
DATA    ?= synthetic:64
EVAL_DATA ?= synthetic:16
BENCH   ?= synthetic
ADAPTER ?= runs/stage2/final
ARGS    ?=
# eval's base model: the adapter's own unless MODEL= is given
EVAL_MODEL = $(if $(filter command line environment,$(origin MODEL)),--model $(MODEL),)

.PHONY: setup stage1 stage2 eval test bench lint clean

setup: .venv/.done
.venv/.done: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

stage1: setup
	$(PY) train.py --stage 1 --model $(MODEL) --data $(DATA) --preset $(PRESET) $(ARGS)

stage2: setup
	$(PY) train.py --stage 2 --model $(MODEL) --data $(DATA) --preset $(PRESET) $(ARGS)

eval: setup
	$(PY) eval.py --bench $(BENCH) --data $(EVAL_DATA) $(EVAL_MODEL) $(if $(ADAPTER),--adapter $(ADAPTER),) $(ARGS)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench.py crop
	$(PY) bench.py logprobs
	$(PY) bench.py rollout

lint: setup
	$(PY) -m compileall -q *.py kernels tests

clean:
	rm -rf runs .pytest_cache
