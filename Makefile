# Forseti: `make install && make test`, then `make run` for the embedded stack.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU hosts take the pinned CPU wheel; a GPU host sets its own, e.g. make install TORCH="torch==2.13.0 --index-url ..."
# TORCH=none skips torch and the RL extra that needs it: the event backbone alone.
TORCH ?= torch==2.13.0
comma := ,
EXTRAS := $(if $(filter none,$(TORCH)),dev$(comma)tracing,dev$(comma)ml$(comma)llm$(comma)federated$(comma)tracing)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install test lint format mypy run bench bench-flower-env schemas clean all

all: lint test

install: $(VENV)/.installed

# llama-cpp-python has no wheel on PyPI. Built with pip's defaults it targets the build host's CPU
# (GGML_NATIVE), and pip's wheel cache then hands that build to any machine: one built where AMX and
# AVX-512 are usable segfaulted in llama_decode on a VM where they are not. So it is built once per
# machine for x86-64-v3 (AVX2, FMA, F16C), kept in a cache of its own, and installed from there.
LLAMA := llama-cpp-python==0.3.36
LLAMA_WHEELS ?= $(HOME)/.cache/forseti/wheels/llama-x86-64-v3
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

# pip runs quietly; each step says what it is doing and how long it may take, so a long build does
# not look like a hang
$(VENV)/.installed: pyproject.toml
	@echo "install: a virtual environment in $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@if [ "$(TORCH)" != "none" ]; then echo "install: $(TORCH) (the CPU wheel on CPU hosts)"; fi
	if [ "$(TORCH)" != "none" ]; then $(BIN)/pip install --quiet $(TORCH); fi
	@if [ "$(TORCH)" != "none" ] && ! ls $(LLAMA_WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then \
	  echo "install: building $(LLAMA) from source, once per machine (5-13 minutes on 2 cores)"; fi
	if [ "$(TORCH)" != "none" ]; then \
	  ls $(LLAMA_WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
	    CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/pip wheel --quiet --no-deps --no-cache-dir -w $(LLAMA_WHEELS) "$(LLAMA)"; \
	  $(BIN)/pip install --quiet $(LLAMA_WHEELS)/llama_cpp_python-0.3.36-*.whl; \
	fi
	@echo "install: forseti-worker and its extras ($(EXTRAS)), editable"
	@# setuptools warns on every editable install that folders (worker/, schemas/, ...) share names
	@# with the package's subpackages: DESIGN.md's layout, on purpose (package-dir maps them)
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@
	@echo "install: done; the forseti command is $(BIN)/forseti"

test: install
	$(BIN)/pytest

# mypy cannot follow setuptools' package-dir mapping through the editable finder, so it checks a
# view of the tree under the import names: .mypy_view/forseti/<folder> -> ../../<folder>.
mypy: install
	rm -rf .mypy_view && mkdir -p .mypy_view/forseti
	for d in client worker schemas envs adapters; do ln -s ../../$$d .mypy_view/forseti/$$d; done
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
	cd bench && ../$(BIN)/python scale.py
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/supervised_quality.py
	$(BIN)/python bench/supervised_speed.py
	$(BIN)/python bench/edge.py
	cd bench && ../$(BIN)/python federated.py
	cd bench && ../$(BIN)/python mlops.py

# Flower's simulation runtime (Ray) for bench/federated.py's baseline, in an environment of its own:
# flwr[simulation] pins versions of cryptography, protobuf, typer and rich that Forseti's differ from.
FLOWER_VENV ?= .venv-flower
bench-flower-env: $(FLOWER_VENV)/.installed

$(FLOWER_VENV)/.installed:
	$(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_VENV)/bin/pip install --quiet $(if $(filter none,$(TORCH)),torch==2.13.0,$(TORCH)) scikit-learn "flwr[simulation]==1.42.0"
	touch $@

clean:
	rm -rf $(VENV) $(FLOWER_VENV) .mypy_view .mypy_cache .ruff_cache .pytest_cache build *.egg-info
