"""The checks before a commit are the checks of `make lint`, run with .venv's tools.

.pre-commit-config.yaml names `make` targets; the Makefile's `lint` target depends on the same
ones. Read with `make -n` (which runs nothing), so the test needs neither pre-commit nor network.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _hooks() -> list[dict[str, Any]]:
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    assert [repo["repo"] for repo in config["repos"]] == ["local"], "a remote hook repo is a download"
    hooks: list[dict[str, Any]] = config["repos"][0]["hooks"]
    return hooks


def _make_dry_run(*targets: str) -> list[str]:
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", *targets],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.splitlines()


def test_pre_commit_runs_the_make_lint_targets_and_nothing_else() -> None:
    """Each hook is local (language system, no environment to download) and runs one `make` target
    on the whole tree; together they are exactly the targets `make lint` depends on."""
    hooks = _hooks()
    targets = []
    for hook in hooks:
        assert hook["language"] == "system" and hook["pass_filenames"] is False, hook["id"]
        match = re.fullmatch(r"make --no-print-directory (\S+)", hook["entry"])
        assert match, hook["entry"]
        targets.append(match.group(1))
    [lint_rule] = re.findall(r"^lint:(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert targets == lint_rule.split()
    assert _make_dry_run("lint") == [line for target in targets for line in _make_dry_run(target)]


def test_make_lint_checks_ruff_format_types_and_imports_with_the_venvs_tools() -> None:
    """`make lint` runs ruff check, ruff format --check, mypy (its strict config in pyproject.toml)
    and the import contracts, each from .venv/bin: what CI installed from the lock."""
    commands = _make_dry_run("lint")
    assert all(command.startswith(".venv/bin/") for command in commands), commands
    tools = [command.split()[0].removeprefix(".venv/bin/") for command in commands]
    assert tools == ["ruff", "ruff", "mypy", "lint-imports"]
    assert commands[0].split()[1] == "check"
    assert commands[1].split()[1:3] == ["format", "--check"]
    assert commands[0].split()[2:] == commands[1].split()[3:]  # the same paths for both
