# homepot-gateway — contract §2. Both targets work on a fresh machine and are idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PYTEST_ARGS ?=
## Test files run on this many workers (pytest-xdist; one file stays on one worker, so a
## module's fixtures, e.g. the service install, are built once). 0 runs them in this process.
## Six on 2 cores: the suite waits on timers and processes far longer than it computes
## (~300 s of CPU, Chromium's renderers included, in ~800 s of test time). Measured on one
## 2-core machine: 4 workers 198 s, 6 workers 167-169 s, and 206 s / 241 s at 6 with one /
## two busy loops beside it (every test passed).
PYTEST_WORKERS ?= 6
## test-fast's workers. Its tests wait more than they compute (protocol timers: will delays,
## keep-alives, expiries, fall-over graces; ~70 s of waiting to ~45 s of CPU in one process),
## so four workers on 2 cores run one's waits beside the others' work.
FAST_WORKERS ?= 4

## Debian packages the test suite drives. A missing one is a test failure, not a skip:
## `make test` installs them when it runs as root, and stops with a clear message otherwise.
## Extend the list here when a test needs another tool (e.g. chromium for browser tests).
DEBIAN_TEST_PACKAGES := mosquitto mosquitto-clients systemd passwd python3-venv chromium chromium-headless-shell curl faketime prometheus systemd-container util-linux
## Commands the tests call, checked after the install.
TEST_TOOLS := mosquitto mosquitto_sub mosquitto_pub mosquitto_passwd systemd-analyze useradd userdel chromium chromium-headless-shell curl faketime promtool systemd-nspawn nsenter

.PHONY: run test test-fast install install-test install-service debian-test-deps bytecode bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(STAMP)

install: $(STAMP)
install-test: $(TEST_STAMP)

## Installs the missing DEBIAN_TEST_PACKAGES (as root, with apt-get), then checks TEST_TOOLS.
debian-test-deps:
	@missing=""; \
	for p in $(DEBIAN_TEST_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian packages for the tests:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null \
	      || { echo "make test: apt-get install$$missing failed" >&2; exit 1; }; \
	  else \
	    echo "make test: the tests need the Debian packages$$missing; run make test as root (it installs them) or: sudo apt-get install$$missing" >&2; \
	    exit 1; \
	  fi; \
	fi
	@for t in $(TEST_TOOLS); do \
	  command -v "$$t" >/dev/null 2>&1 || [ -x "/usr/sbin/$$t" ] || { echo "make test: $$t not found after installing $(DEBIAN_TEST_PACKAGES)" >&2; exit 1; }; \
	done

## The suite starts hundreds of Python processes (daemons, CLI runs, device agents). Where
## PYTHONDONTWRITEBYTECODE is set (as on the CI machines) none of them writes the project's .pyc
## files, so each one compiled every module again: ~0.17 s of CPU per daemon start. Compiled
## once here (only what changed since; Python still checks each .pyc against its source).
bytecode: $(TEST_STAMP)
	$(PY) -m compileall -q gateway bridges devices tests bench >/dev/null

run: $(STAMP)
	$(VENV)/bin/homepot-gateway --config ./config.toml run

## compileall writes the plain .pyc files; pytest keeps its own, assert-rewritten copy of each
## test module and writes it only where bytecode writing is on. Without it each worker parses
## and rewrites every test module again, ~4 s of CPU per worker per run: on for the test run.
TEST_ENV := PYTHONDONTWRITEBYTECODE=

test: $(TEST_STAMP) debian-test-deps bytecode
	$(TEST_ENV) HYPOTHESIS_PROFILE=full $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

## The unit-level tests only: everything not marked e2e (tests/conftest.py marks a test that
## starts a process: the daemon, Mosquitto, the CLI, a browser). Under a minute on 2 cores.
## The hypothesis tests run a tenth of their examples here (profile "fast",
## tests/helpers/fuzz.py); `make test` runs the full counts.
test-fast: $(TEST_STAMP) bytecode
	$(TEST_ENV) HYPOTHESIS_PROFILE=fast $(PY) -m pytest -n $(FAST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not e2e" $(PYTEST_ARGS)

## The service: venv in /opt/homepot-gateway, CLI linked into /usr/local/bin, user homepot,
## /etc/homepot-gateway/config.toml, the unit. Root; safe to run again (systemd/install.sh).
install-service:
	./systemd/install.sh

bench: $(TEST_STAMP) debian-test-deps bytecode
	$(PY) -m bench

clean:
	rm -rf $(VENV) var .pytest_cache
