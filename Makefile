# pefsim: `make demo` runs the life-cycle demo on a local stack, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime
STAMP := $(VENV)/.installed

.PHONY: demo test check protos check-protos lint-protos conformance-doc dashboards clean

$(RUNTIME): requirements.txt pyproject.toml  ## what the services and the CLI need, nothing more
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt setuptools==84.2.1  # the editable install's build
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

$(STAMP): $(RUNTIME) requirements-dev.txt  ## and what the tests, the linters and the generators need
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: $(RUNTIME)
	$(VENV)/bin/pefsim demo

test: $(STAMP)
	$(PY) -m pytest

check: $(STAMP)  ## the fast loop, no service processes: unit tests, the in-process stack, every conformance row in process, lint
	@start=$$(date +%s); $(PY) -m pytest -q -p no:cacheprovider -m "not processes" tests/unit tests/inprocess tests/conformance \
		&& $(VENV)/bin/ruff check . && echo "make check: $$(( $$(date +%s) - start )) s"

protos: $(STAMP)  ## regenerate pefsim/v1 from protos/
	$(PY) tools/gen_protos.py

check-protos: $(STAMP)
	$(PY) tools/gen_protos.py --check

lint-protos:  ## buf from the npm registry (package.json)
	npm ci --silent && npx buf lint

conformance-doc: $(STAMP)  ## regenerate docs/conformance.md from the call tables
	$(PY) tools/gen_conformance.py

dashboards: $(STAMP)  ## regenerate deploy/grafana/dashboards from tools/gen_dashboards.py
	$(PY) tools/gen_dashboards.py

clean:
	rm -rf $(VENV) node_modules
