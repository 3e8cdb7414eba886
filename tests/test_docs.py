"""docs/reliability.md lists every test of the fault suite (marked fault or bad_input) by name."""

import ast

from helpers import REPO

SUITE_MARKS = {"fault", "bad_input"}


def _marks(node):
    """Marker names in a decorator list or a `pytestmark = ...` value."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr in SUITE_MARKS and isinstance(sub.value, ast.Attribute) \
                and sub.value.attr == "mark":
            found.add(sub.attr)
    return found


def suite_tests():
    """{test function name: its file} for every test marked fault or bad_input, read from the sources."""
    found = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marks = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
                module_marks |= _marks(node.value)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and (
                    module_marks or any(_marks(d) for d in node.decorator_list)):
                found[node.name] = path.relative_to(REPO)
    return found


def test_the_reliability_page_lists_every_fault_and_bad_input_test():
    tests = suite_tests()
    assert len(tests) > 50   # the suite is there, and this scan sees it
    page = (REPO / "docs" / "reliability.md").read_text()
    missing = sorted(f"{path}::{name}" for name, path in tests.items() if f"`{name}`" not in page)
    assert not missing, "add these to docs/reliability.md:\n" + "\n".join(missing)
