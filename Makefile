# Two commands on a fresh machine: `make export` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ISPA := $(VENV)/bin/ispa
OUT ?= artifacts/demo

.PHONY: export test bench eval engine verify train gpu-check clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

export: $(VENV)/.installed
	$(ISPA) export --out $(OUT)

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(ISPA) bench

eval: $(VENV)/.installed
	$(ISPA) eval

engine: $(VENV)/.installed
	$(ISPA) engine $(OUT)

verify: $(VENV)/.installed
	$(ISPA) verify $(OUT)

# Reproduces ispa_export/data/demo.safetensors: stage 1 on a 12-frame rolling cache (44 min on 2 CPU
# cores, 2 threads), stage 2 drawing a 12- or 24-frame cache per step, so that both of
# `ispa eval --regime`'s settings are in the training distribution (32 min, 1 thread).
train: $(VENV)/.installed
	$(PY) -m ispa_export.lab.train --out artifacts/train/demo_stage1.safetensors --seed 0 --steps 3900 --frames 24 --threads 2
	$(PY) -m ispa_export.lab.train --out artifacts/train/demo.safetensors --init artifacts/train/demo_stage1.safetensors \
		--capacities 12,24 --seed 1 --steps 1200 --lr 3e-4 --warmup 50 --frames 24 --threads 1 --eval

# The real-size job on a lent GPU with the machine's own python3 (torch with CUDA, numpy, safetensors,
# cuda-python): no venv, nothing installed. `make gpu-check GPU_ARGS="--device cpu --model tiny"` on a CPU.
GPU_OUT ?= artifacts/gpu_check
gpu-check:
	PYTHONPATH=. PYTHONUNBUFFERED=1 $(PYTHON) -m ispa_export.lab.gpu_check --out $(GPU_OUT) $(GPU_ARGS)

clean:
	rm -rf $(VENV) artifacts
