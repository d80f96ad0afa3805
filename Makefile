# make stage1 | baseline | stage2 | eval | test | bench | figures. The default is the README's experiment: the micro
# model from its committed warm start on the micro task (CPU, minutes): `make stage1` (information gap), `make baseline`
# (no gap: a readable global image, crops from it), `make stage2`, then `make eval` (every model there is, with and
# without noise crops, at the gap level) prints the table. MODEL=, DATA=, PRESET= pass through to the training
# targets (PRESET=tiny MODEL=tiny DATA=synthetic:64: the old toy default); `make eval` evaluates at EVAL_SETTINGS on
# EVAL_DATA, the micro runs' own, and with another MODEL=, DATA= or PRESET= asks for those too. ARGS= adds
# train.py/eval.py options.
# NPROC=N runs stage1, baseline, stage2 and eval data-parallel on N GPUs of this node (torchrun; README "More GPUs").
# Every target runs `setup` first, so a fresh clone needs nothing else.
PY      := .venv/bin/python
PRESET  ?= micro
MODEL   ?=
DATA    ?=
EVAL_DATA ?= micro:64
BENCH   ?= synthetic
# the models `make eval` compares (none: the warm start itself); those not trained yet are skipped
ADAPTERS ?= none runs/baseline/final runs/stage1/final runs/stage2/final
EVAL_OUT ?= runs/eval
# every model evaluated alike: the global image at the gap level (16 tokens), crops from the original
EVAL_SETTINGS ?= --model micro --prompt micro --global-tokens 16 --crop-tokens 64 --max-turns 3 --max-turn-tokens 48 \
	--max-response-tokens 160
ARGS    ?=
NPROC   ?= 1
# train.py and eval.py: under torchrun when NPROC > 1 (python -m torch.distributed.run is torchrun, from the venv)
RUN     = $(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC),$(PY))
TRAIN = $(RUN) train.py --preset $(PRESET) $(if $(MODEL),--model $(MODEL),) $(if $(DATA),--data $(DATA),)

.PHONY: setup stage1 baseline stage2 eval experiment test bench gpu-check figures lint clean

# One make at a time while .venv is built (a fresh clone, or requirements.txt changed): two at once would
# both build it, into the same folder.
setup: .venv/.done
.venv/.done: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

stage1: setup
	$(TRAIN) --stage 1 $(ARGS)

# the paper's same-resolution baseline: the global image readable (100 tokens) and crops cut from it
BASELINE := --stage 1 --infogap=off --global_tokens=100
baseline: setup
	$(TRAIN) $(BASELINE) --out_dir=runs/baseline $(ARGS)

stage2: setup
	$(TRAIN) --stage 2 $(ARGS)

# the micro settings would evaluate another model's adapters on the micro model: stop and say so
comma := ,
NOT_MICRO = $(filter-out micro,$(MODEL) $(PRESET)) $(filter-out micro micro:%,$(subst $(comma), ,$(DATA)))
EVAL_GUARD = $(if $(and $(strip $(NOT_MICRO)),$(filter file,$(origin EVAL_SETTINGS))),\
	$(error make eval: EVAL_SETTINGS and EVAL_DATA are the micro experiment's; with MODEL, DATA or PRESET give \
	them too (EVAL_SETTINGS="--model M ...", EVAL_DATA=...), or run eval.py \
	(README: "Evaluation on the paper's benchmarks")))

eval: setup
	$(EVAL_GUARD)
	@for a in $(ADAPTERS); do \
		if [ "$$a" != none ] && [ ! -f "$$a/adapter_config.json" ]; then echo "skipping $$a (not trained)"; continue; fi; \
		name=$$(echo $$a | tr / _); \
		for probe in "" noise-replace; do \
			$(RUN) eval.py --bench $(BENCH) --data $(EVAL_DATA) --adapter $$a $(EVAL_SETTINGS) $(ARGS) \
				$${probe:+--probe $$probe} --out $(EVAL_OUT)/$$name$${probe:+-$$probe} || exit 1; \
		done; \
	done
	$(PY) eval.py --bench $(BENCH) --summary --out $(EVAL_OUT)/summary  # --summary reads the folders beside --out

# the README's table over seeds: each seed's four models in runs/exp/s<seed>/, evaluated into runs/exp/s<seed>/eval/
SEEDS ?= 0 2 3
EXP ?= runs/exp
experiment: setup
	$(EVAL_GUARD)
	@for s in $(SEEDS); do \
		d=$(EXP)/s$$s; \
		$(TRAIN) --stage 1 --seed=$$s --out_dir=$$d/stage1 $(ARGS) || exit 1; \
		$(TRAIN) $(BASELINE) --seed=$$s --out_dir=$$d/baseline $(ARGS) || exit 1; \
		$(TRAIN) --stage 2 --seed=$$s --init_adapter=$$d/stage1/final --out_dir=$$d/stage2 $(ARGS) || exit 1; \
		$(MAKE) --no-print-directory eval ADAPTERS="none $$d/baseline/final $$d/stage1/final $$d/stage2/final" \
			EVAL_OUT=$$d/eval || exit 1; \
	done
	$(PY) plot.py $(foreach s,$(SEEDS),$(EXP)/s$(s)/stage1 $(EXP)/s$(s)/baseline) --out docs/micro_curves.png
	$(PY) eval.py --bench $(BENCH) --summary --out $(EXP)/summary  # the table over every seed in $(EXP)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench.py crop
	$(PY) bench.py logprobs
	$(PY) bench.py rollout

# on a CUDA machine, within 8 minutes: the three benchmarks, two 24gb-preset steps, the GPU tests; writes
# runs/gpu-check/report.md. ARGS="--budget 540" for another limit; ARGS="--only train,tests" runs some parts.
# No `setup` first: a GPU box may have no network; its own python3 (torch >= 2.11, triton >= 3.6) will do.
GPU_PY ?= $(if $(wildcard .venv/bin/python),$(PY),python3)
gpu-check:
	$(GPU_PY) gpu_check.py $(ARGS)

# Three of the README's pictures, from train.py's own default (tiny model, synthetic data; CPU, a few minutes): the curves of
# stage 1 against the no-gap baseline, the global-budget sweep, and a screenshot of an HTML report (Debian's chromium).
FIG := runs/figures
FIG_EVAL := --crop-tokens 64 --max-turn-tokens 48 --max-response-tokens 160
figures: setup
	rm -rf $(FIG)
	$(PY) train.py --stage 1 --preset tiny --out_dir=$(FIG)/stage1
	$(PY) train.py --stage 1 --preset tiny --out_dir=$(FIG)/baseline --infogap=off
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
