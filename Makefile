# The commands README.md quotes. On a fresh machine `make demo` and `make test` each install what they need first
# (CPU build of torch, then this package with its test and benchmark extras), once.
PYTHON ?= python3
TORCH_CPU ?= torch==2.13.0
STAMP := build/.installed

.PHONY: install demo test lint format bench bench-smoke gpu-check wheel clean

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

lint: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

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

wheel: $(STAMP)
	$(PYTHON) -m build --wheel --outdir dist .

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
