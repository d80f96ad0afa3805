# make stage1 | stage2 | eval | test | bench | figures, with MODEL=, DATA=, PRESET= passed through; NPROC=N runs stage1,
# stage2 and eval data-parallel on N GPUs of this node (torchrun; README "More GPUs"). `make eval`
# takes the budgets and tool limits the adapter was trained with (its config.json); ARGS=--global-tokens=1024 overrides.
# Every target runs `setup` first, so a fresh clone needs nothing else.
PY      := .venv/bin/python
MODEL   ?= tiny
PRESET  ?= tiny
DATA    ?= synthetic:64
EVAL_DATA ?= synthetic:16
BENCH   ?= synthetic
ADAPTER ?= runs/stage2/final
ARGS    ?=
NPROC   ?= 1
# train.py and eval.py: under torchrun when NPROC > 1 (python -m torch.distributed.run is torchrun, from the venv)
RUN     = $(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC),$(PY))
# eval's base model: the adapter's own unless MODEL= is given
EVAL_MODEL = $(if $(filter command line environment,$(origin MODEL)),--model $(MODEL),)

.PHONY: setup stage1 stage2 eval test bench gpu-check figures lint clean

setup: .venv/.done
.venv/.done: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

stage1: setup
	$(RUN) train.py --stage 1 --model $(MODEL) --data $(DATA) --preset $(PRESET) $(ARGS)

stage2: setup
	$(RUN) train.py --stage 2 --model $(MODEL) --data $(DATA) --preset $(PRESET) $(ARGS)

eval: setup
	$(RUN) eval.py --bench $(BENCH) --data $(EVAL_DATA) $(EVAL_MODEL) $(if $(ADAPTER),--adapter $(ADAPTER),) $(ARGS)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench.py crop
	$(PY) bench.py logprobs
	$(PY) bench.py rollout

# on a CUDA machine: GPU tests, the three benchmarks, two 24gb-preset steps; writes runs/gpu-check/report.md.
# No `setup` first: a GPU box may have no network; its own python3 (torch >= 2.11, triton >= 3.6) will do.
GPU_PY ?= $(if $(wildcard .venv/bin/python),$(PY),python3)
gpu-check:
	$(GPU_PY) gpu_check.py

# The README's pictures, from the built-in default (tiny model, synthetic data; CPU, a few minutes): the curves of
# stage 1 against the no-gap baseline, the global-budget sweep, and a screenshot of an HTML report (Debian's chromium).
FIG := runs/figures
FIG_EVAL := --crop-tokens 64 --max-turn-tokens 48 --max-response-tokens 160
figures: setup
	rm -rf $(FIG)
	$(PY) train.py --stage 1 --out_dir=$(FIG)/stage1
	$(PY) train.py --stage 1 --out_dir=$(FIG)/baseline --infogap=off
	$(PY) plot.py $(FIG)/stage1 $(FIG)/baseline --out docs/curves.png
	$(PY) eval.py --bench synthetic --data synthetic:8 --sweep 16,64,256 --out $(FIG)/sweep $(FIG_EVAL)
	cp $(FIG)/sweep/sweep.png docs/sweep.png
	$(PY) eval.py --bench synthetic --data synthetic:2 --out $(FIG)/eval --html $(FIG)/report.html --global-tokens 64 $(FIG_EVAL)
	chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
		--disable-sync --no-first-run --user-data-dir=$$(mktemp -d) --hide-scrollbars --window-size=1000,1250 \
		--screenshot=$(CURDIR)/docs/report.png file://$(CURDIR)/$(FIG)/report.html

lint: setup
	$(PY) -m compileall -q *.py kernels tests

clean:
	rm -rf runs .pytest_cache
