"""The `eesd` command line: one dispatcher, one module per subcommand.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int` and imports heavy libraries (torch,
transformers) only inside `run`, so that `eesd simulate` and `eesd --help` stay torch-free and fast.
User mistakes (a `ValueError` or a missing file) print one line and exit with status 2, without a traceback;
set `EESD_DEBUG=1` to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("executor.generate_cli", "generate text with AR or EESD and print acceptance stats"),
    "train-head": (
        "executor.train_head_cli",
        "self-distil a one-layer exit head, or rank a vocabulary subset (--vocab-subset N), as safetensors",
    ),
    "simulate": ("sim.cli", "simulate AR / EESD / PPSD from a scenario YAML (torch-free)"),
    "calibrate": ("calibrate.cli", "measure latency profiles, acceptance traces and link profiles for the simulator"),
    "validate": ("calibrate.validate_cli", "check the simulator's predictions against the executor on this machine"),
}


def register(name: str, module: str, help_text: str) -> None:
    """Add a subcommand (used by the packages that provide one)."""
    SUBCOMMANDS[name] = (module, help_text)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand; only `command`'s module is imported (its arguments and `run`), so that one
    subcommand never needs another's dependencies (`eesd calibrate` on a GPU box without simpy, say)."""
    parser = argparse.ArgumentParser(prog="eesd", description="Early-exit self-speculative decoding toolkit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        if os.environ.get("EESD_DEBUG"):
            raise
        print(f"eesd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"eesd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
