"""The package's shape: imports point down the documented layers (import-linter), ruff is clean, no module is over
600 lines, and a config in the old shape is refused in one line saying where the setting moved."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "lint-imports"), "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PATH": str(BIN), "PYTHONPATH": str(pythonpath)},
        timeout=300,
    )


def test_layer_contracts_hold():
    res = lint_imports(ROOT, ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "2 kept, 0 broken" in res.stdout


@pytest.mark.parametrize(
    "module, upward",
    [
        ("core/functional.py", "from adamerge.methods import base"),  # core reaching up to the Lightning methods
        ("serving.py", "from adamerge.methods import surgery"),  # serving importing a LightningModule
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward):
    """A copy of the package with one upward import added inside a function: the contract fails and names it."""
    shutil.copytree(ROOT / "adamerge", tmp_path / "adamerge", ignore=shutil.ignore_patterns("__pycache__", "bench"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "adamerge" / module
    target.write_text(target.read_text() + f"\n\ndef _upward():\n    {upward}  # noqa: F401\n")
    res = lint_imports(tmp_path, tmp_path)
    assert res.returncode != 0
    assert "BROKEN" in res.stdout and upward.split()[1] in res.stdout, res.stdout[-3000:]


def test_ruff_lint_and_format_are_clean():
    paths = ["adamerge", "tests", "benchmarks", "experiments", "examples", "scripts"]
    for command in (["check", *paths], ["format", "--check", *paths]):
        res = subprocess.run([str(BIN / "ruff"), *command], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:]


def test_no_module_over_600_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "adamerge").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert not long, long


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"model": {"class_path": "adamerge.methods.AdaMerging", "init_args": {"temperature": 2.0}}},
            "model.init_args.temperature moved to model.init_args.objective: {name: <objective>, temperature: ...}",
        ),
        (
            {"model": {"class_path": "adamerge.methods.ConcreteTaskArithmetic", "init_args": {"temperature": 0.5}}},
            "model.init_args.temperature moved to model.init_args.mask_temperature",
        ),
        (
            {"model": {"class_path": "adamerge.methods.Ties", "init_args": {"density": 0.2}}},
            "model.init_args.density moved to model.init_args.prep: {ties_density: ...}",
        ),
        (
            {"model": {"class_path": "adamerge.methods.AdaMerging", "init_args": {"betas": [0.9, 0.99]}}},
            "model.init_args.betas moved to model.init_args.optimizer: {class_path: torch.optim.Adam",
        ),
        ({"batchnorm_statistics": "task"}, "batchnorm_statistics moved to model.init_args.batchnorm_statistics"),
        (
            {"trainer": {"callbacks": [{"class_path": "adamerge.callbacks.SelectStep"}]}},
            "adamerge.callbacks.SelectStep moved to adamerge.training.SelectStep",
        ),
    ],
)
def test_a_config_in_the_old_shape_says_where_the_setting_moved(tmp_path, config, message):
    import yaml

    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(config))
    res = subprocess.run(
        [sys.executable, "-m", "adamerge", "fit", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert message in lines[0] and str(path) in lines[0]
