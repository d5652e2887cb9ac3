# ip2p-jax: `make demo` and `make test` set up a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

CHROMIUM := /usr/bin/chromium

.PHONY: setup browser test test-fast demo app lint clean train-shapes ship-shapes

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[torch,app,eval,ray,dev]" "$(TORCH)"
	touch $(STAMP)

# The web app's browser test drives Debian's Chromium (installed as root, or by hand).
browser: $(CHROMIUM)

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else \
		echo "tests/test_app.py needs $(CHROMIUM): sudo apt-get install chromium"; exit 1; \
	fi

# Two xdist workers, a test module (or group, tests/conftest.py) to each, longest first; the
# 15 slowest tests are printed at the end.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder --durations=15

test: setup browser
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not full_size"

demo: setup
	$(PY) -m ip2p_jax demo

app: setup
	$(PY) -m ip2p_jax app

# The shapes world end to end: data, the VAE, then the editing model in four stages: the UNet
# on the frozen random text encoder; both trained together from stage 1's model; then both
# again from stage 2's with word dropout on the instructions, and once more from stage 3's
# with more dropout (long on a CPU; the *_STEPS shorten it, e.g. make train-shapes
# VAE_STEPS=300 SHAPES_STEPS=500 SHAPES_DECAY=100 TEXT_STEPS=200 TEXT_DECAY=100
# WORD_STEPS=200 WORD_DECAY=100 MORE_WORD_STEPS=200 MORE_WORD_DECAY=100).
SHAPES_DIR ?= data/shapes
RUNS ?= runs
VAE_STEPS ?= 1250
SHAPES_STEPS ?= 21500
# The learning rate's linear cool-down: the last SHAPES_DECAY steps.
SHAPES_DECAY ?= 4000
TEXT_STEPS ?= 2250
TEXT_DECAY ?= 1500
WORD_STEPS ?= 4000
WORD_DECAY ?= 2000
WORD_DROPOUT ?= 0.1
MORE_WORD_STEPS ?= 5000
MORE_WORD_DECAY ?= 2500
MORE_WORD_DROPOUT ?= 0.15
# All four UNet stages: the shapes config, resumable, on the data and the VAE trained here.
TRAIN_SHAPES_UNET := $(PY) -m ip2p_jax train --config configs/shapes_tiny.py --resume \
	--config.data.path=$(SHAPES_DIR) --config.model.vae_from=$(RUNS)/shapes_vae/vae_model
train-shapes: setup
	test -d $(SHAPES_DIR)/edit_pairs || $(PY) -m ip2p_jax datagen shapes --num 20000 --out $(SHAPES_DIR)
	$(PY) -m ip2p_jax train-vae --config configs/shapes_vae.py --workdir $(RUNS)/shapes_vae \
		--resume --config.data.path=$(SHAPES_DIR) --config.steps=$(VAE_STEPS)
	$(TRAIN_SHAPES_UNET) --workdir $(RUNS)/shapes_tiny \
		--config.steps=$(SHAPES_STEPS) --config.optim.decay_steps=$(SHAPES_DECAY)
	$(TRAIN_SHAPES_UNET) --workdir $(RUNS)/shapes_joint \
		--config.steps=$(TEXT_STEPS) --config.optim.decay_steps=$(TEXT_DECAY) \
		--config.model.train_text_encoder=True --config.model.init_from=$(RUNS)/shapes_tiny/model
	$(TRAIN_SHAPES_UNET) --workdir $(RUNS)/shapes_words \
		--config.steps=$(WORD_STEPS) --config.optim.decay_steps=$(WORD_DECAY) \
		--config.data.word_dropout=$(WORD_DROPOUT) \
		--config.model.train_text_encoder=True --config.model.init_from=$(RUNS)/shapes_joint/model
	$(TRAIN_SHAPES_UNET) --workdir $(RUNS)/shapes_words2 \
		--config.steps=$(MORE_WORD_STEPS) --config.optim.decay_steps=$(MORE_WORD_DECAY) \
		--config.data.word_dropout=$(MORE_WORD_DROPOUT) \
		--config.model.train_text_encoder=True --config.model.init_from=$(RUNS)/shapes_words/model

# The fourth stage's newest checkpoint (EMA) -> the package's bundled model (diffusers
# layout, float16).
# The model card (the folder's README.md) is kept across the overwrite.
ship-shapes: setup
	$(PY) -m ip2p_jax export-run $(RUNS)/shapes_words2 $(RUNS)/shapes_words2/snapshot --overwrite
	cp ip2p_jax/assets/shapes_model/README.md $(RUNS)/shapes_model_card.md
	$(PY) -m ip2p_jax export $(RUNS)/shapes_words2/snapshot ip2p_jax/assets/shapes_model \
		--dtype float16 --overwrite
	cp $(RUNS)/shapes_model_card.md ip2p_jax/assets/shapes_model/README.md

# The lent GPU's one command (no setup: that machine has no network; tests/gpu/conftest.py,
# scripts/device_check.sh). DEVICE_CHECK_ARGS=--cpu runs it at tiny size on this CPU.
.PHONY: device-check
device-check:
	bash scripts/device_check.sh $(DEVICE_CHECK_ARGS)

# The shapes model trained on the lent GPU (configs/shapes_gpu.py; scripts/device_train_shapes.sh):
# generate, train, export float16 to $(OUT)/shapes_model, score. DEVICE_TRAIN_ARGS=--cpu: tiny.
.PHONY: device-train-shapes
device-train-shapes:
	bash scripts/device_train_shapes.sh $(DEVICE_TRAIN_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) out .pytest_cache
