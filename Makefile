# The two commands (README.md): `make run` and `make test`.
.PHONY: run test setup lint lint-ruff lint-format lint-types lint-imports lock bench coverage

run:
	bash scripts/setup.sh services venv app
	.venv/bin/recon run

# The import contracts run first: they take a second and say at once when the layout broke.
test:
	bash scripts/setup.sh services venv
	.venv/bin/lint-imports
	.venv/bin/pytest

# One list of checks: `make lint` runs these targets, and .pre-commit-config.yaml runs each of
# them as a hook before a commit (tests/test_lint_config.py keeps the two in step).
LINT_PATHS = worker handlers tests bench scripts
lint: lint-ruff lint-format lint-types lint-imports

lint-ruff:
	.venv/bin/ruff check $(LINT_PATHS)

lint-format:
	.venv/bin/ruff format --check $(LINT_PATHS)

lint-types:
	.venv/bin/mypy

lint-imports:
	.venv/bin/lint-imports

# The lock: requirements.txt (the image) and requirements-dev.txt (.venv, CI), exact versions with
# hashes for every platform, compiled by uv from pyproject.toml's ranges. Pins that still fit the
# ranges are kept; `make lock UPGRADE=1` moves every one to the newest allowed. The dev lock is
# constrained by the runtime one, so the image runs the versions the tests ran.
UV = $(shell command -v uv 2>/dev/null || echo .venv/bin/uv)
COMPILE = $(UV) pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command "make lock" --quiet $(if $(UPGRADE),--upgrade)

lock:
	test -x "$(UV)" || .venv/bin/pip install --quiet uv
	$(COMPILE) --output-file requirements.txt
	$(COMPILE) --extra dev --constraint requirements.txt --output-file requirements-dev.txt

bench:
	bash scripts/setup.sh services venv
	.venv/bin/python bench/intake.py
	.venv/bin/python bench/reconcile.py

# The whole suite under coverage.py (branches, and the worker processes the tests start), then the
# per-module table and worker/'s and handlers/' line and branch figures. Targets: 95% lines, 90% branches.
coverage:
	bash scripts/setup.sh services venv
	bash scripts/coverage.sh
