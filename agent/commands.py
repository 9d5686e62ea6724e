"""`dgdm agent`, `dgdm demo` and `dgdm bench {kernels,sync,http}`.

Registration imports nothing heavy: each command imports its module when it runs, so
`dgdm --help` stays fast and `dgdm agent` loads only what the service needs.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path

from dgdm.agent import backup_cli

BENCHES = {
    "kernels": "dgdm.kernels.bench",
    "sync": "dgdm.sync.bench",
    "http": "dgdm.agent.bench",
    "fleet": "dgdm.sync.bench_fleet",
    "soak": "dgdm.sync.bench_soak",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agent = sub.add_parser("agent", help="run the edge agent service")
    agent.add_argument(
        "--config", type=Path, default=None, help="TOML config (default /etc/dgdm/agent.toml)"
    )
    agent.set_defaults(func=run_agent)
    # No action: the service, as always; `backup` / `restore` act on its data.
    backup_cli.register(agent.add_subparsers(dest="agent_command", metavar="ACTION"))

    demo = sub.add_parser("demo", help="broker, coordinator and one agent on this machine")
    demo.add_argument("--graphs", type=int, default=20, help="graphs to send (default 20)")
    demo.add_argument(
        "--duration", type=float, default=None, help="keep sending for this many seconds"
    )
    demo.set_defaults(func=run_demo)

    bench = sub.add_parser("bench", help="benchmarks: kernels, sync, http")
    benches = bench.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, module in BENCHES.items():
        # The bench's own options are parsed when it runs, so that building the parser
        # (every `dgdm` call) does not import the benchmarks and what they need.
        # prefix_chars "+": this level treats "--x" as plain words, so all of them reach
        # the bench's own parser (built when it runs, with its `add_arguments`).
        parser = benches.add_parser(
            name, help=f"benchmark {name} (--help: its options)", add_help=False, prefix_chars="+"
        )
        parser.add_argument("options", nargs=argparse.REMAINDER)
        parser.set_defaults(func=_bench_runner(name, module))


def run_agent(args: argparse.Namespace) -> int:
    import asyncio

    from dgdm.agent import logs
    from dgdm.agent.config import load_config, validate
    from dgdm.agent.runtime import serve

    config = load_config(args.config)
    validate(config)
    logs.setup(config.log.level)
    return asyncio.run(serve(config, args.config))


def run_demo(args: argparse.Namespace) -> int:
    from dgdm.agent.demo import main

    return main(args)


def _bench_runner(name: str, module: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from dgdm.agent.errors import AgentError

        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise AgentError(f"{module} is not available: {exc}") from exc
        parser = argparse.ArgumentParser(prog=f"dgdm bench {name}")
        add = getattr(mod, "add_arguments", None)
        if add is not None:
            add(parser)
        options = parser.parse_args(args.options)
        return int(mod.main(options) or 0)

    return run
