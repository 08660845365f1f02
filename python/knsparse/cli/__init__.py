"""The ``knsparse`` command line: ``prune | finetune | inspect | export | audit | demo``.

A thin shell over the library. A mistake on the user's side (a missing file, a bad pattern,
an unknown model or layer) prints one line and exits with status 2, without a traceback
(``KNSPARSE_DEBUG=1`` shows it).

Under ``torchrun --nproc-per-node N --no-python knsparse ...`` ``prune`` and ``finetune`` run on every
process (calibration and training split over them, rank 0 writes and prints); the other
commands run on rank 0 alone.

Plugins: every entry point of the group ``knsparse.plugins`` (a package's ``pyproject.toml``:
``[project.entry-points."knsparse.plugins"] mine = "mypkg.knsparse_plugin"``) is imported first,
so the methods, backends and families it registers (``ks.register_method``,
``ks.register_backend``, ``ks.register_family``) are choices of every command.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

import torch

from ..app.registry import UserError
from ..utils import distributed
from . import audit, demo, export, finetune, inspect, prune
from .args import Parser

COMMANDS = (prune, finetune, inspect, export, audit, demo)
"""One module a command, each with ``add_parser(subparsers)`` and ``run(args) -> exit status``."""


PLUGIN_GROUP = "knsparse.plugins"


def load_plugins() -> list[str]:
    """Import every ``knsparse.plugins`` entry point (once per process); returns their names.
    A plugin that fails to import is a ``UserError`` naming it."""
    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
        except Exception as exc:  # any failure of someone else's code: name the plugin
            raise UserError(
                f"plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        loaded.append(ep.name)
    return loaded


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="knsparse",
        description="k:n / 2:4 semi-structured sparse inference for vision models: prune, inspect, "
        "export to ONNX/TensorRT and audit dense vs sparse throughput.",
        epilog="Run 'knsparse <command> --help' for the options of each command.",
    )
    parser.usage_on_error = True  # `knsparse` alone: the usage line, then the error (exit 2)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{prune,finetune,inspect,export,audit,demo}"
    )

    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..backends import BackendUnavailableError
    from ..deploy.export import ParityError

    try:
        load_plugins()
    except UserError as err:
        print(f"knsparse: error: {err}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    if distributed.launched() and not getattr(args, "distributed", False):
        if int(os.environ["RANK"]) != 0:
            return 0  # a one-process command: rank 0 runs it alone
    elif distributed.init() and not distributed.is_main():
        args.quiet, sys.stdout = True, open(os.devnull, "w")  # noqa: SIM115 - rank 0 prints
    handled: tuple[type[BaseException], ...] = (
        UserError,
        ValueError,
        TypeError,
        FileNotFoundError,
        BackendUnavailableError,
        ParityError,
    )
    try:
        return args.func(args)
    except handled as err:
        if os.environ.get("KNSPARSE_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"knsparse {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"knsparse {args.command}: interrupted", file=sys.stderr)
        return 130
    except torch.distributed.DistError as err:  # a rank died or timed out: name it, no hang
        rank = distributed.rank()
        print(f"knsparse {args.command}: rank {rank}: distributed error: {err}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
