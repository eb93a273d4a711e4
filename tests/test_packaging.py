"""The wheel a user installs holds every module of the layout, the migrations and the typing marker."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _source_modules() -> set[str]:
    found = set()
    for package in ("worker", "handlers", "schema"):
        for path in (ROOT / package).rglob("*.py"):
            found.add(path.relative_to(ROOT).as_posix())
    return found


@pytest.mark.slow
def test_the_wheel_holds_every_subpackage_module_and_migration(tmp_path: Path) -> None:
    """Built as `pip install .` builds it (setuptools, package discovery): every .py file under
    worker/, handlers/ and schema/ is in the wheel, so is every migration and py.typed."""
    tree = tmp_path / "src"
    shutil.copytree(
        ROOT,
        tree,
        ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "bench"),
    )
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(tree)],
        check=True,
        capture_output=True,
    )
    [wheel] = out.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert _source_modules() <= names, sorted(_source_modules() - names)
    migrations = {p.relative_to(ROOT).as_posix() for p in (ROOT / "schema").glob("*.sql")}
    assert migrations and migrations <= names
    assert "worker/py.typed" in names
    assert {"worker/intake/receiver.py", "worker/consume/runner.py", "worker/amqp/topology.py"} <= names
