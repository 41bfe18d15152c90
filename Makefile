# Forseti: `make install && make test`, then `make run` for the embedded stack.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU hosts take the pinned CPU wheel; a GPU host sets its own, e.g. make install TORCH="torch==2.13.0 --index-url ..."
# TORCH=none skips torch and the RL extra that needs it: the event backbone alone.
TORCH ?= torch==2.13.0
comma := ,
EXTRAS := $(if $(filter none,$(TORCH)),dev,dev$(comma)ml$(comma)llm)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install test lint format mypy run bench schemas clean all

all: lint test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	if [ "$(TORCH)" != "none" ]; then $(BIN)/pip install --quiet $(TORCH); fi
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

test: install
	$(BIN)/pytest

# mypy cannot follow setuptools' package-dir mapping through the editable finder, so it checks a
# view of the tree under the import names: .mypy_view/forseti/<folder> -> ../../<folder>.
mypy: install
	rm -rf .mypy_view && mkdir -p .mypy_view/forseti
	for d in worker schemas envs adapters; do ln -s ../../$$d .mypy_view/forseti/$$d; done
	cd .mypy_view && MYPYPATH=. ../$(BIN)/mypy --config-file ../pyproject.toml -p forseti
	MYPYPATH=.mypy_view:bench $(BIN)/mypy tests bench

lint: install mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m forseti.schemas.generate --check

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

schemas: install
	$(BIN)/python -m forseti.schemas.generate

run: install
	$(BIN)/forseti up

bench: install
	$(BIN)/python bench/bus.py
	cd bench && ../$(BIN)/python rl_throughput.py
	cd bench && ../$(BIN)/python rl_learning.py
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/supervised_quality.py
	$(BIN)/python bench/supervised_speed.py
	$(BIN)/python bench/edge.py

clean:
	rm -rf $(VENV) .mypy_view .mypy_cache .ruff_cache .pytest_cache build *.egg-info
