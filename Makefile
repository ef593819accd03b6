# proxypal.py: `make test` is all CI runs. Nothing here is needed to *use* the proxy.
PYTHON ?= python3

.PHONY: test bench run lint clean

test:
	@$(PYTHON) -c "import pytest" 2>/dev/null || $(PYTHON) -m pip install --quiet pytest
	PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m pytest -q -p no:cacheprovider -p no:benchmark tests

bench:
	$(PYTHON) tests/bench.py

run:
	$(PYTHON) proxypal.py $(ARGS)

lint:
	$(PYTHON) -m py_compile proxypal.py
	@if command -v vermin >/dev/null 2>&1; then \
		vermin --target=3.8- --no-tips --violations proxypal.py; \
	else echo "lint: vermin not installed, skipping (pip install vermin)"; fi
	@if $(PYTHON) -m pyflakes --version >/dev/null 2>&1; then \
		$(PYTHON) -m pyflakes proxypal.py tests; \
	else echo "lint: pyflakes not installed, skipping (pip install pyflakes)"; fi

clean:
	rm -rf .pytest_cache tests/__pycache__ __pycache__
