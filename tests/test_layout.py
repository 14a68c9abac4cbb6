"""The layout shows the architecture (README "Layout"): models that mirror checkpoints in engine/models/, inference
in engine/, kernels that import nothing from engine/, modules small enough to read, and a README table that names
every module the tree has."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels", "streaming")
MAX_LINES = 600


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_kernels_import_nothing_from_the_engine():
    for path in (ROOT / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "engine" or n.startswith("engine.") for n in names), \
                f"{path.relative_to(ROOT)} imports {names} (line {node.lineno}): kernels take what they need as arguments"


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


def test_readme_layout_table_names_every_module():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):readme.index("## Tests")]
    rows = dict(re.findall(r"^\| `([^`]+)` \| (.*) \|$", table, flags=re.M))
    assert "engine/models/" in rows and "engine/" in rows and "kernels/" in rows and "streaming/" in rows
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        if rel.endswith("__init__.py"):
            continue
        row = max((r for r in rows if r.endswith("/") and rel.startswith(r)), key=len)  # the deepest folder row
        rest = rel[len(row):]
        entry = f"`{rest}`" if "/" not in rest else f"`{rest.split('/')[0]}/`"  # a sub-package: named as a folder
        assert entry in rows[row], f"README's layout row {row} does not name {entry}"
    for entry in rows:
        assert (ROOT / entry).exists(), f"README's layout table names {entry}, which is not in the tree"
