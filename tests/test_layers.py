"""The package's shape: the import contract (import-linter, pyproject's [tool.importlinter]), no private names
imported across modules, no module that only re-exports another's names.

import-linter reads the package from the file system, and ``adapters/`` installs as ``pgzoo.adapters`` from the top
of the repository, so the tests lay the installed layout out in a temporary folder (pgzoo/ with adapters/ inside)
and lint that copy.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


def installed_layout(dest: Path) -> Path:
    """``dest/pgzoo`` as installed: the library with the adapters at ``pgzoo/adapters``; returns ``dest``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "pgzoo", dest / "pgzoo", ignore=ignore)
    shutil.copytree(ROOT / "adapters", dest / "pgzoo" / "adapters", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def lint(tree: Path) -> subprocess.CompletedProcess:
    if not Path(LINT).exists():
        pytest.fail("lint-imports is not installed: `pip install -e '.[dev]'` installs import-linter")
    return subprocess.run([LINT, "pyproject.toml", "--no-cache"], cwd=tree, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_import_contract_holds(tmp_path):
    out = lint(installed_layout(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 2 kept, 0 broken." in out.stdout


def test_import_contract_fails_on_an_upward_import(tmp_path):
    """A function-level import from a low layer (pgzoo.batch) of a high one (the CLI) breaks the contract."""
    tree = installed_layout(tmp_path)
    batch = tree / "pgzoo" / "batch.py"
    batch.write_text(batch.read_text() + "\n\ndef _upward():\n    from pgzoo.cli.main import main\n\n    return main\n")
    out = lint(tree)
    assert out.returncode != 0
    assert "pgzoo.batch is not allowed to import pgzoo.cli" in out.stdout, out.stdout


def test_adapters_never_import_each_other(tmp_path):
    tree = installed_layout(tmp_path)
    rollout = tree / "pgzoo" / "adapters" / "trl" / "rollout.py"
    rollout.write_text(rollout.read_text() + "\n\ndef _sideways():\n    import pgzoo.adapters.lightning.run_folder\n")
    out = lint(tree)
    assert out.returncode != 0
    assert "trainer adapters are siblings that never import each other BROKEN" in out.stdout, out.stdout


def python_files() -> list[Path]:
    return sorted(p for folder in ("pgzoo", "adapters", "benchmarks", "tests") for p in (ROOT / folder).rglob("*.py")
                  if "__pycache__" not in p.parts)


def test_no_private_name_is_imported_from_another_module():
    """``from x import _name`` across modules (function-level imports included): a private name stays in its module.
    Tests' own helper modules (``tests/_*.py``) are modules like any other, imported by their public names."""
    found = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {alias.name}")
    assert not found, "\n".join(found)


def test_no_module_re_exports():
    """No shim: outside a package's ``__init__`` (a package's public API), a module neither consists of imports
    alone, nor lists an imported name in ``__all__``, nor imports a name at module level that it never uses (the
    shape of an import kept for an old path)."""
    shims = []
    for path in sorted((ROOT / "pgzoo").rglob("*.py")) + sorted((ROOT / "adapters").rglob("*.py")):
        if path.name == "__init__.py" or "__pycache__" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        where = str(path.relative_to(ROOT))
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        if body and all(isinstance(n, (ast.Import, ast.ImportFrom)) or
                        (isinstance(n, ast.Assign) and [getattr(t, "id", "") for t in n.targets] == ["__all__"])
                        for n in body):
            shims.append(f"{where}: imports only")
        imported = {(a.asname or a.name).split(".")[0]: n.lineno for n in body
                    if isinstance(n, (ast.Import, ast.ImportFrom)) and getattr(n, "module", "") != "__future__"
                    for a in n.names}
        exported = {e.value for n in body if isinstance(n, ast.Assign)
                    and [getattr(t, "id", "") for t in n.targets] == ["__all__"] and isinstance(n.value, ast.List)
                    for e in n.value.elts if isinstance(e, ast.Constant)}
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        shims += [f"{where}:{imported[name]}: {name} imported and listed in __all__" for name in exported & set(imported)]
        shims += [f"{where}:{line}: {name} imported, never used" for name, line in imported.items() if name not in used]
    assert not shims, "\n".join(shims)
