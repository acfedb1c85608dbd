# Every target installs what it needs, so `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
# The CPU wheel of torch. A bare `pip install torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-torch test lint format demo

install-torch:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"

install: install-torch
	@$(PYTHON) -c "import curvlinops, pytest, xdist, matplotlib" 2>/dev/null || $(PYTHON) -m pip install -q -e ".[test]"

test: install
	$(PYTHON) -m pytest -n 2 --dist loadgroup -q test

lint:
	@$(PYTHON) -c "import ruff" 2>/dev/null || $(PYTHON) -m pip install -q ruff
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m ruff check .

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

# The command-line report on the built-in problem: a table on stdout and the density in report.png.
demo: install
	@$(PYTHON) -c "import matplotlib" 2>/dev/null || $(PYTHON) -m pip install -q matplotlib
	$(PYTHON) -m curvlinops report --plot report.png

.PHONY: docs bench bench-quick

# The Sphinx documentation in docs/_build/html; warnings are errors.
docs: install
	@$(PYTHON) -c "import sphinx" 2>/dev/null || $(PYTHON) -m pip install -q sphinx
	$(PYTHON) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs built: docs/_build/html/index.html"

# Product costs relative to a gradient (see benchmarks/README.md); writes benchmarks/results/.
bench: install
	$(PYTHON) benchmarks/bench_products.py
	$(PYTHON) benchmarks/bench_kfac.py
	$(PYTHON) benchmarks/bench_diagonals.py
	$(PYTHON) benchmarks/bench_eigsh.py
	$(PYTHON) benchmarks/bench_estimators.py
	$(PYTHON) benchmarks/bench_memory.py
	$(PYTHON) benchmarks/targets.py

bench-quick: install
	$(PYTHON) benchmarks/bench_products.py --quick
	$(PYTHON) benchmarks/bench_kfac.py --quick
	$(PYTHON) benchmarks/bench_diagonals.py --quick
	$(PYTHON) benchmarks/bench_eigsh.py --quick
	$(PYTHON) benchmarks/bench_estimators.py --quick
	$(PYTHON) benchmarks/bench_memory.py --quick
	$(PYTHON) benchmarks/targets.py
