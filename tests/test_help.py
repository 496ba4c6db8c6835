"""`--help` a person can learn from: whole at 80 columns, with examples that are real commands."""

import re
import shlex

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from casm_deploy.cli import app
from casm_deploy.version import __version__

runner = CliRunner()
CLI = get_command(app)
COMMANDS = [
    ("data",),
    ("data", "synth"),
    ("data", "tiny-imagenet"),
    ("train",),
    ("eval",),
    ("visualize",),
    ("export",),
    ("infer",),
]


def render_help(path: tuple[str, ...], columns: int) -> str:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return re.sub(r"\x1b\[[0-9;]*m", "", result.output)  # colour codes, where a CI forces them


def find_command(path: tuple[str, ...]):
    command = CLI
    for name in path:
        command = command.commands[name]
    return command


def examples(text: str) -> list[list[str]]:
    """The example commands of a help text: its lines starting with `casm-deploy` (a line
    ending in a backslash continues on the next), split as the shell would, without the
    program name and trailing comments."""
    found, current = [], None
    for line in text.splitlines():
        line = line.strip()
        if current is not None:
            current += " " + line
        elif line.startswith("casm-deploy "):
            current = line
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1]
        else:
            found.append(shlex.split(current, comments=True)[1:])
            current = None
    return found


def parse(args: list[str]):
    """The command an example runs, its arguments parsed as the CLI parses them but not run:
    an unknown option, a missing argument or a bad value raises click's UsageError."""
    command, rest = CLI, list(args)
    while rest and rest[0] in getattr(command, "commands", {}):
        command = command.commands[rest.pop(0)]
    command.make_context(command.name, rest)
    return command


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_is_whole_and_its_examples_are_real_commands(path, columns):
    text = render_help(path, columns)
    command = find_command(path)
    assert "…" not in text  # Rich cuts what does not fit with an ellipsis
    for param in command.params:  # every flag name whole, --no- forms included
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("--"):
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), name
    assert "Example" in text
    shown = examples(text)
    # Every example line is shown as written: none was re-wrapped to fit the terminal.
    assert shown == examples(command.epilog)
    for args in shown:
        ran = parse(args)
        assert ran is command or ran in getattr(command, "commands", {}).values(), args


@pytest.mark.parametrize("name", ["train", "export", "infer"])
def test_help_paragraphs_wrap_to_the_terminal_not_to_the_source(name):
    lines = [line.strip() for line in render_help((name,), 1000).splitlines()]
    paragraphs = find_command((name,)).help.split("\n\n")
    assert len(paragraphs) > 1
    for paragraph in paragraphs:
        assert " ".join(paragraph.split()) in lines  # one line at 1000 columns: not broken


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"casm-deploy {__version__}"


def test_top_level_help_shows_the_workflow():
    text = render_help((), 80)
    steps = [parse(args).name for args in examples(text)]
    assert steps == ["synth", "train", "export", "infer", "eval"]
    assert "--version" in text
