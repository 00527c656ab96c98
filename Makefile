# cinecut-cache: everyday commands. `make demo` and `make test` are the README's two commands.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test lint bench bench-keyframes bench-scale bench-prewarm bench-remote soak deb docs-config clean

$(VENV)/.installed: pyproject.toml packaging/dev-setup.sh
	VENV=$(VENV) ./packaging/dev-setup.sh

## Run the daemon on a small generated demo library and watch it catch a replacement live.
demo: $(VENV)/.installed
	$(VENV)/bin/cinecutd demo --dir demo-run

## The whole test suite (CI runs exactly this).
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

## Benchmarks (not tests): each prints a table and writes bench/results/<name>.json.
bench: $(VENV)/.installed
	$(PY) bench/bench_core.py
	$(PY) bench/bench_keyframes.py
	$(PY) bench/bench_worker_overhead.py
	$(PY) bench/bench_daemon.py

bench-keyframes: $(VENV)/.installed
	$(PY) bench/bench_keyframes.py

## Large libraries: flat vs foldered, events during rescans, first start over upstream-written work dirs.
bench-scale: $(VENV)/.installed
	$(PY) bench/bench_flat_library.py
	$(PY) -m bench.bench_first_start

## Pre-warm: salvage after a subtitle change; sequential vs parallel frames/s (add ARGS=--size 7b on a GPU).
bench-prewarm: $(VENV)/.installed
	$(PY) bench/bench_salvage.py
	$(PY) bench/bench_prewarm_throughput.py $(ARGS)

## Remote workers on RQ/Redis (needs redis-server): films per hour with 1 and 2 workers, coordination overhead.
bench-remote: $(VENV)/.installed
	$(PY) bench/bench_remote_workers.py

## Regenerate the config reference from the code's schema.
docs-config: $(VENV)/.installed
	$(PY) -m cinecutd.config docs/config.md

## Long churn soak against a running daemon (the CI version runs in `make test`).
soak: $(VENV)/.installed
	$(PY) -m bench.soak --operations 10000

## The Debian package (../cinecut-cache_*.deb).
deb:
	./packaging/build-deb.sh

clean:
	rm -rf demo-run bench/results build dist *.egg-info
