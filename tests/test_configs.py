"""Every config file: documented fields, a smoke variant that runs, and CLI errors for unknown fields."""

import ast
import importlib
import importlib.util
import pathlib
import subprocess
import sys

import pytest

from experiments.dynamics_linear_cl import cifar_path

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))


def load(path):
    spec = importlib.util.spec_from_file_location(f"configs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smoke_runs():
    for path in CONFIG_FILES:
        for variant, experiment in load(path).SMOKE_VARIANTS.items():
            yield pytest.param(path, variant, experiment, id=f"{path.stem}:{variant}")


def test_every_config_file_declares_a_smoke_variant():
    assert CONFIG_FILES
    for path in CONFIG_FILES:
        module = load(path)
        assert module.SMOKE_VARIANTS, f"{path.name} has no smoke variant"
        assert "python -m experiments." in module.__doc__, f"{path.name}'s docstring lacks the command"


def test_every_config_field_has_a_comment():
    """Each `c.section.field = value` assignment in a config file carries a trailing comment."""
    for path in CONFIG_FILES:
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("_base"):
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Attribute) \
                            and not isinstance(stmt.value, ast.Call):
                        line = source[stmt.lineno - 1]
                        assert "#" in line, f"{path.name}:{stmt.lineno} has no comment: {line.strip()}"


def missing_data(config) -> str | None:
    """Why `config` cannot run here: the CIFAR-10 archive it reads is absent (None if nothing is missing)."""
    if "cifar" not in config or not config.get("use_cifar", True):
        return None
    archive = cifar_path(config.cifar.path)
    return None if archive.exists() else f"CIFAR-10 archive {archive} not found; set LORANK_DATA"


@pytest.mark.parametrize("path, variant, experiment", list(smoke_runs()))
def test_smoke_variant_runs(path, variant, experiment, tmp_path):
    config = load(path).get_config(variant)
    reason = missing_data(config)
    if reason:
        pytest.skip(reason)
    importlib.import_module(experiment).run(config, str(tmp_path))
    assert any(tmp_path.iterdir()), f"{experiment} wrote nothing to its workdir"


def test_unknown_config_field_on_the_command_line_is_an_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.pretrain", "--config", "configs/llama.py:smoke",
         "--config.train.stepz=3", "--workdir", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "stepz" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was started
