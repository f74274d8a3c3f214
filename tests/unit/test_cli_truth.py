"""Every command and flag the README, the deploy files and the daemons' own texts (help, error
messages) name exists in the real command line; `config show --all` lists every setting.

The command lines are read from the typer apps themselves, so a flag renamed in the code and not
in the docs (or the other way round) fails here, naming the flag and where it was written.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from cloud_gateway.cli import app as gateway_app
from cloud_gateway.settings import GatewaySettings
from edge_agent.cli import app as agent_app
from edge_agent.settings import AgentSettings

ROOT = Path(__file__).resolve().parents[2]
APPS = {"edge-agent": agent_app, "cloud-gateway": gateway_app}
SETTINGS = {"edge-agent": AgentSettings, "cloud-gateway": GatewaySettings}
PACKAGES = ("edge_agent", "cloud_gateway", "router", "model_runtime")
DOCS = [ROOT / "README.md", *sorted((ROOT / "deploy").rglob("*.toml")),
        *sorted((ROOT / "deploy").rglob("*.service"))]  # fmt: skip

# A command: the program (maybe as a path ending in /bin/<program>), then its words. The program
# must stand alone: /etc/edge-agent/ or edge-agent.toml are not commands.
COMMAND = re.compile(
    r"(?<![\w./-])(?:\S*/bin/)?(edge-agent|cloud-gateway)(?=[ \t]|$)([^\n`|;&>#)]*)", re.M
)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


@dataclass
class Command:
    flags: set[str] = field(default_factory=lambda: {"--help"})
    subcommands: dict[str, Command] = field(default_factory=dict)


def tree(click_command: object) -> Command:
    node = Command()
    for param in getattr(click_command, "params", []):
        node.flags.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
    for name, sub in getattr(click_command, "commands", {}).items():
        node.subcommands[name] = tree(sub)
    return node


TREES = {program: tree(typer.main.get_command(app)) for program, app in APPS.items()}


def all_flags(node: Command) -> set[str]:
    flags = set(node.flags)
    for sub in node.subcommands.values():
        flags |= all_flags(sub)
    return flags


EVERY_FLAG = set.union(*(all_flags(t) for t in TREES.values()))


def problems_in(text: str, where: str, *, prose: bool = True) -> Iterator[str]:
    """Each command, subcommand or flag in `text` that the real command line does not have.
    With `prose` False (messages), only commands in backticks count, not words in a sentence."""
    spans = "\n".join(re.findall(r"`([^`]*)`", text))
    for match in COMMAND.finditer(text if prose else spans):
        program, rest = match.group(1), match.group(2)
        line = (text if prose else spans).count("\n", 0, match.start()) + 1
        node, path = TREES[program], [program]
        words = rest.replace("[", " ").replace("]", " ").split()
        for i, word in enumerate(words):
            if i == 0 and not re.fullmatch(r"--[a-z-]+|[a-z][a-z-]*", word):
                break  # `sudo -u edge-agent /path/...`: a user's name, not a command
            if word.startswith("--"):
                flag = word.split("=")[0]
                if flag not in node.flags:
                    yield f"{where}:{line}: `{' '.join(path)}` has no flag {flag}"
            elif node.subcommands and i == len(path) - 1 and re.fullmatch(r"[a-z][a-z-]*", word):
                if word not in node.subcommands:
                    yield f"{where}:{line}: `{' '.join(path)}` has no command {word!r}"
                    break
                node, path = node.subcommands[word], [*path, word]
    # Flags named on their own, in an inline code span of the docs or in a message (not those
    # of a script, `benchmarks/soak.py` (`--minutes`), named on the same line).
    for match in re.finditer(r"`(--[^`]*)`", text):
        line_text = text[text.rfind("\n", 0, match.start()) + 1 : text.find("\n", match.end())]
        if re.search(r"\.py\b|scripts/", line_text):
            continue
        for flag in FLAG.findall(match.group(1)):
            if flag not in EVERY_FLAG:
                line = text.count("\n", 0, match.start()) + 1
                yield f"{where}:{line}: no command has the flag {flag}"


def help_texts() -> Iterator[tuple[str, str]]:
    """The --help of every command of both daemons."""

    def walk(program: str, path: list[str], node: Command) -> Iterator[tuple[str, str]]:
        result = CliRunner().invoke(APPS[program], [*path[1:], "--help"], prog_name=program)
        assert result.exit_code == 0, (path, result.output)
        yield " ".join([*path, "--help"]), result.output
        for name, sub in node.subcommands.items():
            yield from walk(program, [*path, name], sub)

    for program, node in TREES.items():
        yield from walk(program, [program], node)


def source_strings() -> Iterator[tuple[str, str]]:
    """Every string literal of the daemons' packages: their messages, help texts, docstrings."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_generated" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    yield f"{path.relative_to(ROOT)}:{node.lineno}", node.value


def test_every_command_and_flag_in_the_docs_exists() -> None:
    problems = [p for doc in DOCS for p in problems_in(doc.read_text(), str(doc.relative_to(ROOT)))]
    assert not problems, "\n".join(problems)


def test_every_command_and_flag_in_the_help_texts_exists() -> None:
    problems = [p for where, text in help_texts() for p in problems_in(text, where)]
    assert not problems, "\n".join(problems)


def test_every_command_and_flag_in_the_daemons_messages_exists() -> None:
    strings = list(source_strings())
    problems = [p for where, text in strings for p in problems_in(text, where, prose=False)]
    # A flag in a message stands alone too, not only in backticks (a piece of an f-string
    # such as "--target-{kind}" ends with a dash and is left alone).
    for where, text in strings:
        problems += [
            f"{where}: no command has the flag {flag}"
            for flag in FLAG.findall(text)
            if flag not in EVERY_FLAG and not flag.endswith("-")
        ]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_what_does_not_exist() -> None:
    text = (
        "run `edge-agent serve --queue-capacity 1` or `cloud-gateway config chek`,\n"
        "tune `--workerz`; `edge-agent config check --config f` is fine"
    )
    assert list(problems_in(text, "T")) == [
        "T:1: `edge-agent serve` has no flag --queue-capacity",
        "T:1: `cloud-gateway config` has no command 'chek'",
        "T:2: no command has the flag --workerz",
    ]


@pytest.mark.parametrize("program", APPS)
def test_serve_help_names_the_command_that_lists_every_setting(program: str) -> None:
    result = CliRunner().invoke(APPS[program], ["serve", "--help"], prog_name=program)
    assert f"`{program} config show --all` lists them all" in " ".join(result.output.split())


@pytest.mark.parametrize("program", APPS)
def test_config_show_all_lists_every_setting_with_its_variable_and_meaning(program: str) -> None:
    result = CliRunner().invoke(APPS[program], ["config", "show", "--all"], prog_name=program)
    assert result.exit_code == 0, result.output
    settings = SETTINGS[program]
    prefix = settings.model_config["env_prefix"]
    blocks = re.split(r"\n(?=\w+ = )", result.output.split("\n\n", 1)[1])
    listed = {block.split(" = ")[0]: block for block in blocks}
    assert list(listed) == list(settings.model_fields)
    for key, block in listed.items():
        where, *meaning = block.splitlines()[1:]
        assert where.split(",")[0].strip() == f"{prefix}{key.upper()}", block
        assert meaning, f"setting {key} of {program} has no meaning: give its field a docstring"


@pytest.mark.parametrize("program", APPS)
def test_every_help_states_the_exit_codes(program: str) -> None:
    for where, text in help_texts():
        if where.startswith(program) and "Usage:" in text and "[OPTIONS]\n" in text:
            assert "Exit codes: 0 done; 1 failed while running" in " ".join(text.split()), where
