"""The README's two commands are the project's real entry points: CI runs the test one, character for character."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    first_block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S).group(1)
    return [line for line in first_block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_opens_with_exactly_two_commands():
    commands = readme_commands()
    assert len(commands) == 2, commands
    serve, test = commands
    assert "pip install" in serve and '".[serve]"' in serve and "bentoml serve" in serve
    assert "pip install" in test and "pytest" in test and "train" in test and "dev" in test


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_the_serve_command_names_the_bentofile_service():
    service = re.search(r'^service:\s*"([^"]+)"', (REPO / "bentofile.yaml").read_text(), re.M).group(1)
    assert service in readme_commands()[0]
