"""The lock files are in step with pyproject.toml, and every install reads them.

requirements.txt (the image) and requirements-dev.txt (.venv, CI) are made by `make lock` (uv pip
compile). These checks need no network and no uv: they read the files. A dependency added to,
removed from or re-ranged in pyproject.toml without `make lock` fails here.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "stripe-recon (pyproject.toml)"
# Two environments to compare markers in: where the project runs, and one where uvloop is absent.
ENVIRONMENTS = [
    {"sys_platform": "linux", "os_name": "posix", "platform_system": "Linux", "python_version": "3.11"},
    {"sys_platform": "win32", "os_name": "nt", "platform_system": "Windows", "python_version": "3.11"},
]


@dataclass
class Pin:
    version: str
    marker: Marker | None
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)


def read_lock(name: str) -> dict[str, Pin]:
    """A requirements file as uv writes it: ``name==version ; marker \\``, ``--hash=`` lines, and
    ``# via`` annotations naming who asked for each package."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for line in (ROOT / name).read_text().splitlines():
        text = line.strip().rstrip("\\").strip()
        if not text or (text.startswith("#") and current is None):
            continue
        if not line.startswith((" ", "#")):
            requirement = Requirement(text)
            [spec] = requirement.specifier
            assert spec.operator == "==", f"{name}: {text} is not an exact pin"
            current = pins[canonicalize_name(requirement.name)] = Pin(spec.version, requirement.marker)
        elif current is not None and text.startswith("--hash="):
            current.hashes.append(text.removeprefix("--hash="))
        elif current is not None and text.startswith("#"):
            who = re.sub(r"^#\s*(via)?\s*", "", text)
            if who:
                current.via.append(who)
    return pins


def declared(extra: str | None = None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    if extra:
        requirements += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return requirements


@pytest.mark.parametrize(("lock", "extra"), [("requirements.txt", None), ("requirements-dev.txt", "dev")])
def test_lock_pins_every_declared_dependency_within_its_range(lock: str, extra: str | None) -> None:
    """Each dependency of pyproject.toml (with the dev extra for the dev lock) is pinned to a version
    its range allows, for the same platforms its marker names; nothing else is recorded as asked for
    by the project; and every pin carries hashes, so pip installs it in --require-hashes mode."""
    pins = read_lock(lock)
    wanted = declared(extra)
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in {lock}: run `make lock`"
        pin = pins[name]
        assert requirement.specifier.contains(pin.version, prereleases=True), (
            f"{lock} pins {name}=={pin.version}, outside {requirement}: run `make lock`"
        )
        for environment in ENVIRONMENTS:
            declared_here = requirement.marker is None or requirement.marker.evaluate(environment)
            locked_here = pin.marker is None or pin.marker.evaluate(environment)
            assert locked_here == declared_here, f"{lock}: {name}'s marker differs on {environment}"
    asked_for = {name for name, pin in pins.items() if PROJECT in pin.via}
    assert asked_for == {canonicalize_name(r.name) for r in wanted}, f"{lock} is stale: run `make lock`"
    assert all(pin.hashes for pin in pins.values())


def test_the_image_runs_the_versions_the_tests_ran() -> None:
    """Every package of the runtime lock has the same version in the dev lock (`make lock` compiles
    the dev lock constrained by the runtime one)."""
    runtime, dev = read_lock("requirements.txt"), read_lock("requirements-dev.txt")
    assert {name: pin.version for name, pin in runtime.items()} == {
        name: dev[name].version for name in runtime
    }


def test_every_install_reads_the_lock() -> None:
    """setup.sh (used by `make test`, so by CI) and the Dockerfile install the locked files with
    --require-hashes, then the project itself with --no-deps, so nothing unlocked comes along; the
    image's build context lets the lock in."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "pip install -q --require-hashes -r requirements-dev.txt" in setup
    assert "pip install -q --no-deps --no-build-isolation -e ." in setup
    assert "-e '.[dev]'" not in setup
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh services venv" in (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "pip install --require-hashes -r requirements.txt" in dockerfile
    assert re.search(r"pip install --no-deps /wheels/\*\.whl", dockerfile)
    assert "!requirements.txt" in (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
