"""The README's two set-up commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_setup_commands_verbatim():
    readme = (ROOT / "README.md").read_text().splitlines()
    fence = readme.index("```bash")
    commands = readme[fence + 1 : fence + 3]
    assert readme[fence + 3] == "```"
    assert commands[0].endswith("probe demo") and commands[1].endswith("pytest")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci_lines
