# The two commands a fresh machine needs (README.md): `make serve` and `make test`.
# Both set up .venv first (scripts/setup.sh; instant when already done).
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: setup serve test bench-ingest

setup:
	@scripts/setup.sh

serve: setup
	.venv/bin/nightowl serve --host $(HOST) --port $(PORT)

test: setup
	.venv/bin/python -m pytest $(PYTEST_ARGS)

bench-ingest: setup
	.venv/bin/python -m benchmarks.ingest
