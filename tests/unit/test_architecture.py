"""The controller's layers (controller/__init__.py) hold: imports go only
down, no cycles inside a package (import-linter, .importlinter), and no
function-local import hides one."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# imported where used, and why: bcc takes ~0.3 s and is needed only to compile
LAZY_OK = {"bcc"}


def test_layers_and_no_cycles() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    res = subprocess.run([str(lint), "--config", str(ROOT / ".importlinter")], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "2 kept, 0 broken" in res.stdout


def test_no_function_local_imports() -> None:
    found = []
    for path in sorted((ROOT / "controller").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                if any(n.split(".")[0] not in LAZY_OK for n in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not found, "\n".join(found)


def test_the_cli_loads_the_kernel_only_for_work_on_this_host() -> None:
    """Every ``sgctl`` command that talks to the daemon starts without the
    kernel and service layers (cli/local.py brings them, by name, for the
    one-shot commands and ``sgctl daemon``)."""
    code = ("import sys, controller.cli.main; print(sorted(m for m in sys.modules if "
            "m.startswith(('controller.kernel', 'controller.reconcile', 'controller.service.daemon',"
            " 'scapy', 'bcc', 'pyroute2'))))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout
