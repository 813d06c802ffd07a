"""No module imports another module's private names (``_name``): a name shared between modules is public."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("edgemeta", "exporters", "runtime", "scripts", "examples")


def private_imports(source: str) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` of every ``from module import _name`` in ``source`` (dunders such as
    ``__version__`` are public)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            module = "." * node.level + (node.module or "")
            found += [
                (node.lineno, module, a.name)
                for a in node.names
                if a.name.startswith("_") and not a.name.endswith("__")
            ]
    return found


def test_the_scan_finds_private_imports_at_any_depth():
    source = (
        "from a import b, _c, __version__\nimport d\ndef f():\n    from "
        ".e import _g as h\n    from __future__ import annotations\n"
    )
    assert private_imports(source) == [(1, "a", "_c"), (4, ".e", "_g")]


def test_no_source_file_imports_a_private_name_from_another_module():
    files = [p for top in SCANNED if (ROOT / top).is_dir() for p in sorted((ROOT / top).rglob("*.py"))]
    assert len(files) > 20  # the scan reads the source tree, not an empty folder
    offences = [
        f"{p.relative_to(ROOT)}:{line}: from {module} import {name}"
        for p in files
        for line, module, name in private_imports(p.read_text(encoding="utf-8"))
    ]
    assert not offences, "private names imported across modules (make them public or move them):\n" + "\n".join(
        offences
    )
