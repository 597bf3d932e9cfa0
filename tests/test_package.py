"""The package installs and imports, and the kernels package stays free of trainer imports."""

import ast
from pathlib import Path

import mrt_fast

ROOT = Path(mrt_fast.__file__).parent


def test_version_is_set():
    assert mrt_fast.__version__.count(".") == 2


def test_kernels_import_nothing_from_the_trainer():
    kernels = ROOT / "kernels"
    assert kernels.is_dir(), "mrt_fast/kernels is missing"
    offenders = []
    for path in kernels.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level == 0 and mod.startswith("mrt_fast") and not mod.startswith("mrt_fast.kernels"):
                    offenders.append(f"{path.name}: from {mod}")
                if node.level >= 2:
                    offenders.append(f"{path.name}: relative import above kernels ({'.' * node.level}{mod})")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("mrt_fast") and not alias.name.startswith("mrt_fast.kernels"):
                        offenders.append(f"{path.name}: import {alias.name}")
    assert not offenders, offenders
