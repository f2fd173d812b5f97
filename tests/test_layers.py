"""The package's shape (docs/architecture.md): layers point down, modules stay small, the command line
starts without the heavy libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ldct_clip

PACKAGE = Path(ldct_clip.__file__).parent
UPPER = ("ldct_clip.cli", "ldct_clip.apps")


def _modules(*exclude: str):
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if not relative.startswith(exclude):
            yield path, relative


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_core_never_imports_the_command_line_or_the_applications():
    offenders = {
        relative: sorted(n for n in _imported(path) if n.startswith(UPPER))
        for path, relative in _modules("cli/", "apps/", "__main__.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_module_is_over_500_lines():
    sizes = {relative: len(path.read_text().splitlines()) for path, relative in _modules()}
    assert {k: n for k, n in sizes.items() if n > 500} == {}


def test_the_command_line_parser_loads_no_heavy_library():
    # `ldct-clip --help` and usage errors must answer at once: the command modules import their work lazily
    code = (
        "import sys; from ldct_clip.cli import build_parser; build_parser(); "
        "print(','.join(m for m in ('torch', 'monai', 'pydicom', 'numpy', 'scipy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
