# proxypal.py: `make test` is all CI runs. Nothing here is needed to *use* the proxy.
PYTHON ?= python3

.PHONY: test bench bench-peers run lint clean

test:
	@$(PYTHON) -c "import pytest" 2>/dev/null || $(PYTHON) -m pip install --quiet pytest
	PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m pytest -q -p no:cacheprovider -p no:benchmark --ignore=tests/e2e tests

bench:
	$(PYTHON) tests/bench.py

# the same mock and load through LiteLLM, claude-code-router and Portkey's gateway,
# installed on first use (PyPI, npm) under ~/.cache/proxypal-bench
bench-peers:
	$(PYTHON) tests/bench_peers.py $(BENCH_ARGS)

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

# make e2e: the real clients (agent CLIs from npm, the official SDKs, headless Chromium)
# against the proxy and scripted upstreams. Installs into a cache outside the repository.
.PHONY: e2e
E2E_CACHE ?= $(or $(PROXYPAL_E2E_CACHE),$(HOME)/.cache/proxypal-e2e)
e2e:
	$(PYTHON) tests/e2e/setup_tools.py --cache "$(E2E_CACHE)"
	PYTHONDONTWRITEBYTECODE=1 PROXYPAL_E2E_CACHE="$(E2E_CACHE)" "$(E2E_CACHE)/venv/bin/python" \
		-m pytest -q -p no:cacheprovider --tb=line -rs tests/e2e $(E2E_ARGS)
