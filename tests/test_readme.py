"""The README's two set-up commands are the ones CI runs, so they stay true."""

from conftest import ROOT


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    first_screen = readme.split("## ")[0]
    commands = [l for l in first_screen.splitlines() if l.startswith((".venv/", "python3 -m venv"))]
    assert len(commands) == 2
    for command in commands:
        assert command in ci
