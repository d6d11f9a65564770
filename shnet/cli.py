"""The ``shnet`` command line: the group, its version and top-level error handling. Every command lives
in its area's ``cli.py`` and loads lazily (:data:`LAZY_COMMANDS`), its one-line help read from source."""

from __future__ import annotations

import ast
import atexit
import gc
import sys
from importlib import import_module, util

import click

from .errors import ShnetError
from .fileio import terminal_safe


# Every command, imported only when run or asked for its own help, so that `shnet --help` and the
# light commands never pay for torch, transformers or dask.distributed.
LAZY_COMMANDS = {
    "extract": "shnet.pipeline.cli:extract_command",
    "inspect": "shnet.cache.cli:inspect_command",
    "verify": "shnet.cache.cli:verify_command",
    "train": "shnet.trainer.cli:train_command",
    "evaluate": "shnet.trainer.cli:evaluate_command",
    "import": "shnet.npy_sets.cli:import_command",
    "export": "shnet.npy_sets.cli:export_command",
    "encode": "shnet.retrieval.cli:encode_command",
    "search": "shnet.retrieval.cli:search_command",
    "show": "shnet.show.cli:show_command",
    "demo": "shnet.demo.cli:demo_command",
}


def lazy_short_help(target: str, limit: int = 45) -> str:
    """A lazy command's one-line help, read from its function's docstring in the module's source
    (parsed, not imported); Click shortens it exactly as it does a loaded command's help."""
    module, attr = target.split(":")
    source = util.find_spec(module).origin
    tree = ast.parse(open(source, encoding="utf-8").read(), source)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == attr:
            return click.Command(attr, help=ast.get_docstring(node)).get_short_help_str(limit)
    return load_command(target).get_short_help_str(limit)


def load_command(target: str) -> click.Command:
    module, attr = target.split(":")
    return getattr(import_module(module), attr)


class ShnetGroup(click.Group):
    """Loads the commands of :data:`LAZY_COMMANDS` on first use, and prints a :class:`ShnetError` as
    one message on stderr (exit 1), without a traceback."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, cmd_name):
        if cmd_name in LAZY_COMMANDS and cmd_name not in self.commands:
            self.add_command(load_command(LAZY_COMMANDS[cmd_name]), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx, formatter):
        limit = formatter.width - 6 - max(len(name) for name in self.list_commands(ctx))
        rows = [
            (name, self.commands[name].get_short_help_str(limit) if name in self.commands else lazy_short_help(LAZY_COMMANDS[name], limit))
            for name in self.list_commands(ctx)
            if name in LAZY_COMMANDS or not self.commands[name].hidden
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        # Registered before the command imports anything, so it runs after every other exit handler:
        # whatever is alive at exit is left out of the interpreter's last garbage collections, which
        # with torch and Dask loaded took 1.0-1.3 s after the command's last line, and finalize nothing
        # a command has not already closed itself (its files are committed, its clusters closed).
        atexit.register(gc.freeze)
        try:
            return super().invoke(ctx)
        except ShnetError as exc:
            click.secho(f"shnet: error: {terminal_safe(exc, keep_newlines=True)}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.secho("shnet: interrupted; everything completed so far is kept (re-run the same command to resume)", fg="yellow", err=True)
            sys.exit(130)


@click.group(cls=ShnetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shnet")
def main():
    """Image folders to a trained 3SHNet image-sentence retrieval model."""
