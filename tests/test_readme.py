"""README's commands stay true: every `shnet ...` command line in README.md names a real command and
real options, every benchmark script it names exists, and the newcomer commands are the ones the
tests run (`shnet demo`: tests/test_demo.py; extract/train/evaluate/show/encode/search/import/
export: their own test files)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click

from shnet.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _command_lines() -> list[str]:
    """Every `shnet ...` invocation in README's bash blocks and inline code spans, continuations joined."""
    text = README.read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            for part in re.split(r"&&|\|", line.split(" #")[0]):
                if part.strip().startswith("shnet "):
                    lines.append(part.strip())
    lines += [span for span in re.findall(r"`(shnet [^`]+)`", text) if "[" not in span and "..." not in span]
    return lines


def _options(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in getattr(param, "opts", []) + getattr(param, "secondary_opts", [])}


def test_every_shnet_command_in_readme_names_real_commands_and_options():
    lines = _command_lines()
    assert any(line.startswith("shnet demo") for line in lines), "README's first command is the demo"
    checked = 0
    context = click.Context(main)
    for line in lines:
        words = shlex.split(line.replace("\\", ""))
        name = words[1]
        command = main.get_command(context, name)
        assert command is not None, f"README names an unknown command: {line}"
        known = _options(command) | {"--help", "-h"}
        for word in words[2:]:
            if word.startswith("-") and not re.fullmatch(r"-?\d+(\.\d+)?", word):
                assert word.split("=")[0] in known, f"README uses {word} which `shnet {name}` does not take: {line}"
        checked += 1
    assert checked >= 20


def test_every_benchmark_readme_names_exists():
    root = README.parent
    for script in set(re.findall(r"benchmarks/[\w_]+\.py", README.read_text())):
        assert (root / script).is_file(), script


def test_readme_names_the_profiles_that_ship():
    from shnet.pipeline.profiles import profile_names

    text = README.read_text()
    for name in re.findall(r"--profile ([\w-]+)", text):
        assert name in profile_names() or name == "NAME_OR_FILE", name
