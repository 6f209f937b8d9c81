"""`openrlhf-passk`: one command line with subcommands.

Each subcommand lives in its own module, which exposes `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their subcommand runs, so `--help` and the light commands start fast
and the server/eval extras are needed only by the commands that use them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Nested commands ("maze generate") use a space.
COMMANDS: dict[str, tuple[str, str]] = {
    "maze generate": ("openrlhf_passk.tasks.maze_cli", "Generate maze train/test JSONL files for OpenRLHF."),
    "serve-reward": ("openrlhf_passk.rewards.server", "Serve a task verifier over OpenRLHF's HTTP reward protocol."),
    "advantages": ("openrlhf_passk.advantages_cli", "List the registered advantage estimators or compute some."),
    "doctor": ("openrlhf_passk.integration.doctor", "Report versions, hook status and GPU/vLLM availability."),
    "eval": ("openrlhf_passk.eval", "Score samples or a model on mazes and plot pass@k curves."),
    "sandbox": ("openrlhf_passk.sandbox", "CPU demo: tiny LM, SFT on mazes, then Pass@1 vs Pass@k RL."),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from openrlhf_passk import __version__

    parser = argparse.ArgumentParser(
        prog="openrlhf-passk",
        description="Pass@k Training for OpenRLHF: advantages, maze task, reward server, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"openrlhf-passk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (module, help_text) in COMMANDS.items():
        *parents, leaf = name.split()
        target = sub
        for parent in parents:
            if parent not in groups:
                group = sub.add_parser(parent, help=f"{parent} commands")
                groups[parent] = group.add_subparsers(dest=f"{parent}_command", metavar="COMMAND", required=True)
            target = groups[parent]
        p = target.add_parser(leaf, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Only the chosen subcommand's module is imported to define its arguments.
        if _selected(name, argv):
            importlib.import_module(module).add_arguments(p)
    return parser


def _selected(name: str, argv: list[str]) -> bool:
    words = name.split()
    positional = [a for a in argv if not a.startswith("-")]
    return positional[: len(words)] == words


# Optional dependencies -> the extra that brings them (the core install is only torch + tqdm).
EXTRAS = {"fastapi": "server", "uvicorn": "server", "pydantic": "server", "matplotlib": "eval", "transformers": "eval"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"openrlhf-passk {args.command}: error: this command needs {exc.name}, part of the '{extra}' extra: "
            f"pip install 'openrlhf-passk[{extra}]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
