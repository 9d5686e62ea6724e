"""The `dgdm` command line: one entry point, subcommands registered by each package.

Each package owns the commands for its own job (`kernels.cli`, `sync.cli`, `agent.commands`)
and exposes `register(subparsers)`. Registration modules import nothing heavy: the work is
imported inside the command function, so `dgdm --help` and start-up stay fast.

Exit codes (SPEC §8): 0 success, 2 bad usage or config, 1 any other failure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dgdm.agent import __version__
from dgdm.common.errors import DgdmError
from dgdm.kernels import blas
from dgdm.kernels.errors import GraphError
from dgdm.sync.errors import ConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    from dgdm.agent import commands
    from dgdm.kernels import cli as kernels_cli
    from dgdm.sync import cli as sync_cli

    parser = argparse.ArgumentParser(
        prog="dgdm",
        description="Graph diffusion on Coral Edge TPUs, synced to a cloud coordinator.",
    )
    parser.add_argument("--version", action="version", version=f"dgdm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.register(sub)
    sync_cli.register(sub)
    kernels_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    blas.one_thread_unless_set()  # before any command imports numpy
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or EXIT_OK)
    except (ConfigError, GraphError) as exc:
        print(f"dgdm {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DgdmError as exc:
        print(f"dgdm {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
