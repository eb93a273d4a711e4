# The two commands (README.md): `make run` and `make test`.
.PHONY: run test setup lint bench

run:
	bash scripts/setup.sh services venv app
	.venv/bin/recon run

# The import contracts run first: they take a second and say at once when the layout broke.
test:
	bash scripts/setup.sh services venv
	.venv/bin/lint-imports
	.venv/bin/pytest

lint:
	.venv/bin/ruff check worker handlers tests bench scripts
	.venv/bin/ruff format --check worker handlers tests bench scripts
	.venv/bin/mypy
	.venv/bin/lint-imports

bench:
	bash scripts/setup.sh services venv
	.venv/bin/python bench/intake.py
	.venv/bin/python bench/reconcile.py
