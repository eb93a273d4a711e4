# The two commands (README.md): `make run` and `make test`.
.PHONY: run test setup lint bench

run:
	bash scripts/setup.sh services venv app
	.venv/bin/recon run

test:
	bash scripts/setup.sh services venv
	.venv/bin/pytest

lint:
	.venv/bin/ruff check worker handlers tests bench
	.venv/bin/mypy

bench:
	bash scripts/setup.sh services venv
	.venv/bin/python bench/intake.py
	.venv/bin/python bench/reconcile.py
