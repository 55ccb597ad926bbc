# mgrpc: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench soak lint venv system-deps clean
SCALE ?= 1

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Servers and tools the tests start themselves (mosquitto as the MQTT broker, chromium for the
# dashboard's browser test, PostgreSQL for the fleet's several-workers test: a private cluster).
system-deps:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
	  echo "installing mosquitto from Debian's packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing postgresql from Debian's packages (fleet workers test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }
	@test -x /usr/bin/chromium || { \
	  echo "installing chromium from Debian's packages (dashboard browser test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: $(STAMP)
	$(PY) -m mgrpc demo

test: $(STAMP) system-deps
	$(PY) -m pytest -q tests

bench: $(STAMP)
	@for b in bench/*.py; do [ $$b = bench/soak.py ] && continue; echo "== $$b"; $(PY) $$b || exit 1; done

# Reliability soak (issue #14): power cuts, fuzzing, malformed bundles, kill -9, listeners under abuse (SCALE=0.05 for a short run;
# tests/test_soak.py runs that one in `make test`).
soak: $(STAMP) system-deps
	$(PY) bench/soak.py --scale $(SCALE)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
