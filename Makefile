# The commands README.md quotes. On a fresh machine `make demo` and `make test` each install what they need first
# (CPU build of torch, then this package with its test and benchmark extras), once.
PYTHON ?= python3
TORCH_CPU ?= torch==2.13.0
STAMP := build/.installed

.PHONY: install demo test lint format bench bench-smoke gpu-check peer-wheels wheel clean

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet "$(TORCH_CPU)"
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	@mkdir -p build && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m streammerge demo

test: $(STAMP)
	$(PYTHON) -m pytest -q

# ruff, then the layer contract (import-linter, pyproject.toml) and the static-graph checks it cannot make.
lint: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())" --no-cache
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/test_layers.py

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

bench: $(STAMP)
	$(PYTHON) -m benchmarks.run

bench-smoke: $(STAMP)
	$(PYTHON) -m benchmarks.run --smoke

# On a machine with a CUDA GPU (one shot, ~6 minutes): cuda tests, CPU vs CUDA SHA-256, kernel vs copy, pipeline.
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check

# The peer for gpu-check's mergekit step, as wheels for the lent GPU machine (Python 3.12, x86-64, no package registry
# there): mergekit 0.1.5 and what its image lacks. Carry `.whl` with the run; gpu_check installs them privately.
PEER_WHEELS := mergekit==0.1.5 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 \
	typing_inspection==0.4.5 typing_extensions==4.16.0 immutables==0.21 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
PEER_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_5_x86_64
peer-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(PEER_PLATFORMS)) -d .whl $(PEER_WHEELS)

wheel: $(STAMP)
	$(PYTHON) -m build --wheel --outdir dist .

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
