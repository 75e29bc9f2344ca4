"""The `eesd` command line: one dispatcher, one module per subcommand.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int` and imports heavy libraries (torch,
transformers) only inside `run`, so that `eesd simulate` and `eesd --help` stay torch-free and fast.
User mistakes (a `ValueError` or a missing file) print one line and exit with status 2, without a traceback;
set `EESD_DEBUG=1` to see the traceback anyway. So does a torch command on a simulator-only install (`pip install -e .`
without the `executor` extra): one line naming the extra. A reader that closes the pipe early (`eesd simulate ... |
head`) ends the command quietly, with the status a shell gives a process killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sim.workers import USER_ERRORS

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("executor.generate_cli", "generate text with AR, EESD or PPSD and print the run's stats"),
    "train-head": (
        "executor.train_head_cli",
        "self-distil exit heads (a decoder layer or an attention adapter, optionally over a draft vocabulary), "
        "or rank a vocabulary subset (--vocab-subset N), as safetensors",
    ),
    "simulate": ("sim.cli", "simulate AR / EESD / PPSD from a scenario YAML (torch-free)"),
    "calibrate": (
        "calibrate.cli",
        "measure latency, acceptance traces, links and co-located stages' contention for the simulator",
    ),
    "validate": ("calibrate.validate_cli", "check the simulator's predictions against the executor on this machine"),
    "corpus": (
        "executor.corpus_cli",
        "build an offline corpus for distilling exit heads: the model's own answers, text, Python sources",
    ),
    "serve-sim": (
        "sim.serve_cli",
        "simulate serving under load: arrivals, continuous batching, replicas, SLO capacity (torch-free)",
    ),
    "serve-bench": (
        "executor.serve_cli",
        "serve a workload file with continuous batching on this machine, timed (--replicas: worker processes)",
    ),
}
# the packages of the `executor` extra (pyproject.toml): a command that needs a missing one names the extra
EXECUTOR_EXTRA = ("torch", "transformers", "accelerate", "gguf", "safetensors")
# as README.md says: torch's CPU build first (a bare torch requirement can pull a CUDA build); a CUDA torch is kept
INSTALL_EXTRA = 'pip install torch==2.13.0 && pip install -e ".[executor]" (with a CUDA torch: the extra alone)'
SIGPIPE_STATUS = 141  # 128 + SIGPIPE, as a shell reports a process the signal ended


def register(name: str, module: str, help_text: str) -> None:
    """Add a subcommand (used by the packages that provide one)."""
    SUBCOMMANDS[name] = (module, help_text)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand; only `command`'s module is imported (its arguments and `run`), so that one
    subcommand never needs another's dependencies (`eesd calibrate` on a GPU box without simpy, say)."""
    parser = argparse.ArgumentParser(
        prog="eesd", description="Early-exit self-speculative decoding toolkit.", allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
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
    if getattr(args, "no_progress", False):
        _quiet_loading()
    try:
        status = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return status
    except USER_ERRORS as err:
        return _error(args.command, str(err), err)
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] not in EXECUTOR_EXTRA:
            raise
        return _error(args.command, f"needs the executor extra ({err.name} not installed): {INSTALL_EXTRA}", err)
    except BrokenPipeError:
        return _closed_pipe()
    except KeyboardInterrupt as err:  # a long run's may say what it leaves (train-head: its checkpoint)
        print(f"eesd {args.command}: interrupted" + (f" {err}" if str(err) else ""), file=sys.stderr)
        return 130


def _quiet_loading() -> None:
    """--no-progress: transformers' own bars too ("Loading weights"), which follow huggingface_hub's switch, read
    where transformers is first imported (or turned off here where it already is)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    transformers = sys.modules.get("transformers")  # None where an import of it is blocked (a torch-free run)
    if transformers is not None:
        transformers.utils.logging.disable_progress_bar()


def _error(command: str, message: str, err: Exception) -> int:
    if os.environ.get("EESD_DEBUG"):
        raise err
    print(f"eesd {command}: error: {message}", file=sys.stderr)
    return 2


def _closed_pipe() -> int:
    """The reader of stdout has gone: point stdout at devnull so that the interpreter's final flush cannot raise."""
    try:
        stdout = sys.stdout.fileno()
    except (OSError, ValueError):  # a stream without a descriptor (captured output) has nothing left to flush
        return SIGPIPE_STATUS
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stdout)
    os.close(devnull)
    return SIGPIPE_STATUS


if __name__ == "__main__":
    sys.exit(main())
