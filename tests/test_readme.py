"""README.md's two set-up commands stay true: CI runs the test command verbatim."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]


def fenced_commands(markdown: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```\n(.*?)```", markdown, re.S)]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = fenced_commands(setup)
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    main_job, tests = commands
    assert "python -m experiments.pretrain --config configs/llama.py:tiny" in main_job
    assert tests.endswith("-m pytest")
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()
