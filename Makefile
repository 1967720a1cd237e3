# Everything runs from the project's own virtualenv (.venv), made by `make setup`.
# demo, test and bench install the Debian packages first (scripts/system-deps, as root): on a
# fresh machine even the virtualenv needs one (python3-venv).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTEST_ARGS ?=
BENCH_ARGS ?=
MODULES ?=
comma := ,

.PHONY: setup system-deps test lint fmt demo bench mutate lock clean dist wheelhouse
# Prerequisites are made in the order written: system-deps before setup, always.
.NOTPARALLEL:

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip uv

# Byte-compiled as an installed wheel is (pip compiles at install): with PYTHONDONTWRITEBYTECODE
# set, every command would otherwise compile each module it imports anew (~25 ms of
# `cocoon-net status`, more at daemon start).
setup: $(BIN)/python  ## install the locked dependencies and the package (editable, byte-compiled)
	$(BIN)/uv pip install --python $(BIN)/python -q --compile-bytecode -r requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python -q --no-deps -e .
	$(BIN)/python -m compileall -q src

system-deps:  ## the Debian packages cocoon-net, the demo and the tests run (python3-venv, iproute2, iptables, DHCP clients)
	./scripts/system-deps

test: system-deps setup  ## lint, type-check and run every test (the netns tests need root)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

fmt: setup
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

demo: system-deps setup  ## a node, a VPC peer and three VMs in namespaces: leases, pings, status, cleanup
	$(BIN)/python -m cocoon_net.sandbox

bench: system-deps setup  ## DHCP benchmark against Kea and dnsmasq in namespaces (root; BENCH_ARGS=--relay adds perfdhcp)
	$(BIN)/python -m bench $(BENCH_ARGS)

mutate: setup  ## mutation testing of the guarantee-carrying modules (slow; MODULES=store,policy for some)
	$(BIN)/python scripts/mutate $(subst $(comma), ,$(MODULES))

dist: setup  ## wheel and sdist in dist/, checked with twine
	rm -rf dist
	$(BIN)/uv build -q --sdist --wheel --out-dir dist
	$(BIN)/uvx -q twine check --strict dist/*

# The wheel and its locked dependencies, for scripts/install --wheelhouse on a host without
# a network (the same Python and architecture as this machine).
wheelhouse: dist  ## dist/wheelhouse: what scripts/install --wheelhouse needs
	$(BIN)/pip download -q --disable-pip-version-check -d dist/wheelhouse \
		-c requirements.lock dist/cocoon_net-*.whl

lock:  ## refresh requirements.lock from pyproject.toml
	$(BIN)/uv pip compile pyproject.toml --extra test -o requirements.lock -q

clean:
	rm -rf $(VENV) dist .pytest_cache .mypy_cache .ruff_cache .hypothesis mutants
