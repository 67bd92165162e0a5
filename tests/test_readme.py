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


def test_real_model_section_commands_parse():
    """The real-model section's commands (fetch, export the GGUF, chat) are the CLI's own: each parses with
    the entry point's parser, names a known model and a chat question. (tests/test_smollm2.py runs the same
    steps through the API and `adainfer run --chat`.)"""
    import shlex

    from adainfer.cli import parser as adainfer_parser
    from adainfer.exporter.cli import parser as export_parser
    from adainfer.fetch import KNOWN_MODELS

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Real model: SmolLM2-135M-Instruct\n", 1)[1].split("\n## ", 1)[0]
    commands = [l for l in section.splitlines() if l.startswith(".venv/bin/")]
    assert len(commands) == 3
    fetch_cmd = "$(.venv/bin/adainfer fetch smollm2-135m-instruct)"
    assert fetch_cmd in commands[1]
    parsed = []
    for command in commands:
        argv = shlex.split(command.replace(fetch_cmd, "GGUF"))
        program = {".venv/bin/adainfer": adainfer_parser, ".venv/bin/adainfer-export": export_parser}[argv[0]]
        parsed.append(program().parse_args(argv[1:]))
    assert parsed[0].command == "fetch" and parsed[0].model in KNOWN_MODELS
    assert str(parsed[1].model_dir) == "GGUF" and str(parsed[1].output) == "bundles/smollm2"
    assert parsed[2].command == "run" and parsed[2].args == ["bundles/smollm2"]
    assert parsed[2].chat == "What is the capital of France?"
    assert "### Speed and size against what you would run instead" in section
