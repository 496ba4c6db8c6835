# make demo: set up .venv, generate the embedded data, train the default CASM and Baseline F,
# score them with the baselines, draw the Fig. 2 grid, export the CASM to TorchScript and ONNX
# (export/default) and extract masks and boxes for the validation images with it (out/).
# make test: set up .venv if needed and run the test suite (lint included).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench experiments lint format venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The default recipe in its two phases, so that Baseline F starts from the same classifier;
# each step continues (--resume) a run that is already there.
train_run = $(BIN)/casm-deploy train --name $(1) $(2) $(if $(wildcard runs/$(1)/checkpoint.pt),--resume)
FROM_CLASSIFIER := --weights runs/demo-classifier/checkpoint.pt --pretrain-epochs 0

demo: $(STAMP)
	$(BIN)/casm-deploy data synth
	$(call train_run,demo-classifier,--classifier-only)
	$(call train_run,demo,$(FROM_CLASSIFIER))
	$(call train_run,demo-f,$(FROM_CLASSIFIER) --reproduce F)
	$(BIN)/casm-deploy eval runs/demo/checkpoint.pt runs/demo-f/checkpoint.pt \
		--baseline center,full,gradcam --json runs/demo/eval.json
	$(BIN)/casm-deploy visualize runs/demo/checkpoint.pt runs/demo-f/checkpoint.pt \
		--gradcam-stage 3 --num-images 12 --out runs/demo/figures
	$(BIN)/casm-deploy export runs/demo/checkpoint.pt --onnx --out export/default
	$(BIN)/casm-deploy infer data/synth/val --model export/default/masker.onnx --batch 256 \
		--out out --overwrite

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# make bench: every benchmark script in turn (each prints a table and writes
# benchmarks/results/*.json), then report.py renders benchmarks/RESULTS.md's tables from the
# JSON; the demo is made first when its checkpoint or exports are missing.
bench: $(STAMP)
	test -f runs/demo/checkpoint.pt && test -f export/default/masker.onnx \
		&& test -f export/default/masker.ts || $(MAKE) demo
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/train_step.py --amp bf16
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/infer.py
	$(BIN)/python benchmarks/extraction.py
	$(BIN)/python benchmarks/method_cost.py
	$(BIN)/python benchmarks/image_memory.py
	$(BIN)/python benchmarks/parts_check.py
	$(BIN)/python benchmarks/frontier.py
	$(BIN)/python benchmarks/infer_split.py
	$(BIN)/python benchmarks/peers.py
	$(BIN)/python benchmarks/report.py

# make experiments: the paper's experiments on the embedded data (train/experiments/, about two
# hours on 2 cores); finished jobs are kept, so it can be stopped and started again. It writes
# train/RESULTS.md. SCALE=smoke runs the same jobs on a tiny data set (runs/exp-smoke/);
# SECTIONS=6 (or 1,6) runs those sections only and rewrites only them. Section 8 reads Tiny
# ImageNet's archive from TINY_IMAGENET (the zip or its folder; never committed).
SCALE ?= full
SECTIONS ?=
TINY_IMAGENET ?= ../shared/data/tiny-imagenet-100.zip
experiments: $(STAMP)
	TINY_IMAGENET=$(abspath $(TINY_IMAGENET)) $(BIN)/python train/experiments/run.py \
		--scale $(SCALE) $(if $(SECTIONS),--sections $(SECTIONS))

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
