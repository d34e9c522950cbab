"""The ``atp`` command: one sub-command per module in ``atp_plugin.commands``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .commands.usage import UsageError
from .plugins import PluginError

#: sub-command name -> module in atp_plugin.commands with ``add_arguments(parser)`` and ``run(args) -> int``
COMMANDS = {
    "demo": "demo",
    "circuit": "circuit",
    "evaluate": "evaluate",
    "rank": "rank",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atp",
                                     description="AtP*: fast attribution patching for TransformerLens models")
    parser.add_argument("--version", action="version", version=f"atp-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"atp_plugin.commands.{module_name}")
        text = (module.__doc__ or name).replace("``", "")  # the module docstring, without its reST quoting
        summary = " ".join(text.strip().split("\n\n")[0].split())  # its first paragraph, however many lines
        p = sub.add_parser(name, help=summary, description=text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; a bad argument or a broken plugin is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: join its process group first
        from .engine.distributed import join_from_env
        join_from_env()
    try:
        return args.run(args)
    except (UsageError, PluginError) as e:
        print(f"atp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (atp rank ... | head): not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush does not fail again
        return 0


if __name__ == "__main__":
    sys.exit(main())
