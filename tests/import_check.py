"""What a fresh interpreter imports for some modules, outside the stdlib and an allowed set."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def foreign_imports(modules: list[str], allowed: set[str]) -> list[str]:
    """Top-level packages importing `modules` pulls in beyond the stdlib and `allowed`.
    PySocks (`socks`) is blocked first: paho imports it when it is installed, for proxy
    support the agent does not use; a Pi has none, a dev venv may (selenium brings it)."""
    script = (
        "import sys\n"
        "sys.modules['socks'] = None  # import socks -> ImportError, as on a Pi\n"
        f"import {', '.join(modules)}\n"
        f"allowed = set(sys.stdlib_module_names) | set({sorted(allowed)!r})\n"
        "allowed.add('cython_runtime')  # msgpack's compiled extension\n"
        "loaded = {m.split('.')[0] for m, v in sys.modules.items() if v and m[0] != '_'}\n"
        "print(sorted(loaded - allowed))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
    )
    return ast.literal_eval(result.stdout)  # the list of names the child printed
