"""What the wheel holds and what ``import adamerge`` costs: the package only (no benchmarks, experiments, scripts),
and a public API that imports its modules on first use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_the_package_only():
    """pyproject's package find, as setuptools applies it when it builds the wheel: adamerge and its subpackages,
    never the top-level benchmarks/ (or experiments/, scripts/, tests/) beside it."""
    import tomllib
    from setuptools import find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(where=str(ROOT), **find)
    assert "adamerge" in packages and "adamerge.methods" in packages and "adamerge.kinds" in packages
    assert all(p == "adamerge" or p.startswith("adamerge.") for p in packages), packages
    assert (ROOT / "benchmarks" / "__init__.py").is_file()  # a package, so the exclusion above is what keeps it out


def test_import_adamerge_is_light():
    """``import adamerge`` loads neither Lightning nor torch nor transformers: the public names are lazy."""
    code = (
        "import sys, adamerge; "
        "print(sorted(m for m in ('pytorch_lightning', 'lightning', 'torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_public_name_resolves_to_its_module():
    import adamerge
    from adamerge.cli.main import main
    from adamerge.cli.sweep import search
    from adamerge.errors import MergeInputError
    from adamerge.io.manifest import read_manifest
    from adamerge.serving import load_merged, load_task_model

    for name in adamerge.__all__:
        assert getattr(adamerge, name) is not None, name
    assert set(adamerge.__all__) <= set(dir(adamerge))
    assert (adamerge.MergeInputError, adamerge.load_merged, adamerge.load_task_model, adamerge.read_manifest) == (
        MergeInputError,
        load_merged,
        load_task_model,
        read_manifest,
    )
    assert adamerge.cli_main is main and adamerge.sweep_search is search
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        adamerge.not_a_name  # noqa: B018


def test_benchmarks_import_only_the_public_api():
    """Code under benchmarks/ reaches adamerge through its top-level names (``from adamerge import X``), each one
    in ``adamerge.__all__``."""
    import ast

    import adamerge

    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "adamerge":
                assert node.module == "adamerge", f"{path.name}: from {node.module} import ..."
                missing = [a.name for a in node.names if a.name not in adamerge.__all__]
                assert not missing, f"{path.name}: {missing} not public"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("adamerge."), f"{path.name}: import {alias.name}"
