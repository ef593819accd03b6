"""proxypal.py imports only the standard library and parses on Python 3.8."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "proxypal.py")

def stdlib_names() -> set:
    """The standard library's top-level module names: sys.stdlib_module_names (3.10+),
    else what the interpreter's own stdlib folder and built-ins hold."""
    if hasattr(sys, "stdlib_module_names"):
        return set(sys.stdlib_module_names)
    import sysconfig
    folder = sysconfig.get_paths()["stdlib"]
    # built into the interpreter on the other platforms: msvcrt, winreg (Windows)
    names = set(sys.builtin_module_names) | {"msvcrt", "winreg", "_winapi", "winsound"}
    for entry in os.listdir(folder):
        if entry != "site-packages":
            names.add(entry[:-3] if entry.endswith(".py") else entry.split(".")[0])
    dynload = os.path.join(folder, "lib-dynload")
    if os.path.isdir(dynload):
        names |= {entry.split(".")[0] for entry in os.listdir(dynload)}
    return names


STDLIB = stdlib_names()


def imported_modules(path: str):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, node.module


def test_imports_are_standard_library_only():
    found = list(imported_modules(SOURCE))
    assert len(found) > 10                       # the walk really saw the imports
    outside = [(line, name) for line, name in found
               if name.split(".")[0] not in STDLIB | {"__future__"}]
    assert outside == []


def test_import_has_no_side_effects():
    code = ("import logging, sys; before = set(sys.modules); import proxypal; "
            "assert not logging.getLogger('proxypal').handlers; "
            "assert logging.getLogger().handlers == []; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def python38():
    """A real Python 3.8 (pyenv's shims only pretend to be one)."""
    candidates = [shutil.which("python3.8")]
    pyenv = os.path.expanduser("~/.pyenv/versions")
    if os.path.isdir(pyenv):
        candidates += [os.path.join(pyenv, v, "bin", "python") for v in sorted(os.listdir(pyenv))
                       if v.startswith("3.8.")]
    for path in filter(None, candidates):
        try:
            out = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.stdout.strip() == "(3, 8)":
            return path
    return None


@pytest.mark.skipif(python38() is None, reason="no Python 3.8 interpreter on this machine")
def test_runs_on_python_3_8(tmp_path):
    exe = python38()
    out = subprocess.run([exe, os.path.join(ROOT, "proxypal.py"), "--version"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "proxypal" in out.stdout, out.stderr
    code = ("import asyncio, sys; sys.path.insert(0, sys.argv[1]); import proxypal\n"
            "async def main():\n"
            "    s = await proxypal.start({}, port=0)\n"
            "    r, w = await asyncio.open_connection('127.0.0.1', s.port)\n"
            "    w.write(b'GET /health HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
            "    data = await r.read()\n"
            "    w.close(); await s.close(grace=0.1)\n"
            "    print(data.split(b'\\r\\n')[0].decode())\n"
            "asyncio.run(main())\n")
    out = subprocess.run([exe, "-c", code, ROOT], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "HTTP/1.1 200 OK", out.stderr
