"""House style 11: each test's docstring says the behaviour it pins — and so does each fixture's."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_fixture(decorator: ast.expr) -> bool:
    """@pytest.fixture, @pytest_asyncio.fixture, with or without arguments, or a bare @fixture."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
    return name == "fixture"


def undocumented(source: str) -> list[str]:
    """Names of the test functions (module level or in a Test class) and fixtures in ``source``
    that have no docstring, with their line numbers."""
    missing = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        is_test = node.name.startswith("test_")
        if (is_test or any(_is_fixture(d) for d in node.decorator_list)) and ast.get_docstring(node) is None:
            missing.append(f"{node.name} (line {node.lineno})")
    return missing


def test_the_check_finds_an_undocumented_test_and_fixture() -> None:
    """The walk itself can fail: a test and a fixture without docstrings are named, documented
    ones and plain helpers are not."""
    source = '''
import pytest

@pytest.fixture
def bare(): return 1

@pytest.fixture(scope="session")
async def told():
    """Told."""

def test_bare(): pass

async def test_told():
    """Told."""

def helper(): pass
'''
    assert undocumented(source) == ["bare (line 5)", "test_bare (line 11)"]


def test_every_test_and_fixture_has_a_docstring() -> None:
    """Every test function and every fixture in tests/*.py has a docstring."""
    missing = {
        path.name: names
        for path in sorted(TESTS.glob("*.py"))
        if (names := undocumented(path.read_text(encoding="utf-8")))
    }
    assert missing == {}
