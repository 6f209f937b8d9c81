"""`openrlhf-passk`: one command line with subcommands.

Each subcommand lives in its own module, which exposes `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their subcommand runs, so `--help` and the light commands start fast
and the server/eval extras are needed only by the commands that use them.

Exit status, for every command: 0 success, 2 usage error (argparse, or a flag value the command rejects),
1 runtime error (a file that cannot be written, a missing extra, an unexpected exception: one line on
stderr; OPENRLHF_PASSK_DEBUG=1 shows the traceback), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from openrlhf_passk import env

# name -> (module, one-line help). Nested commands ("maze generate") use a space.
COMMANDS: dict[str, tuple[str, str]] = {
    "maze generate": ("openrlhf_passk.tasks.maze_cli", "Generate maze train/test JSONL files for OpenRLHF."),
    "serve-reward": ("openrlhf_passk.rewards.server", "Serve a task verifier over OpenRLHF's HTTP reward protocol."),
    "advantages": ("openrlhf_passk.advantages_cli", "List the registered advantage estimators or compute some."),
    "doctor": ("openrlhf_passk.integration.doctor", "Report versions, hook status and GPU/vLLM availability."),
    "eval": ("openrlhf_passk.eval", "Score samples or a model on mazes and plot pass@k curves."),
    "sandbox": ("openrlhf_passk.sandbox", "CPU demo: tiny LM, SFT on mazes, then Pass@1 vs Pass@k RL."),
    "tiny-model": (
        "openrlhf_passk.tiny_model",
        "Write a tiny random causal LM and tokenizer (offline) for CPU-mode runs and tests.",
    ),
}
DEBUG_ENV = env.DEBUG


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every command's --help shows defaults; descriptions and epilogs keep their line breaks.

    Defaults that say nothing (None, an off switch, an empty list) and help texts that already name their default are
    left as they are.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default is None or isinstance(action.default, bool) or action.default in ([], ())
        if quiet or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from openrlhf_passk import __version__

    parser = argparse.ArgumentParser(
        prog="openrlhf-passk",
        description="Pass@k Training for OpenRLHF: advantages, maze task, reward server, evaluation.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"openrlhf-passk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (module, help_text) in COMMANDS.items():
        *parents, leaf = name.split()
        target = sub
        for parent in parents:
            if parent not in groups:
                group = sub.add_parser(parent, help=f"{parent} commands", formatter_class=HelpFormatter)
                groups[parent] = group.add_subparsers(dest=f"{parent}_command", metavar="COMMAND", required=True)
            target = groups[parent]
        p = target.add_parser(leaf, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Only the chosen subcommand's module is imported to define its arguments.
        if _selected(name, argv):
            importlib.import_module(module).add_arguments(p)
        p.formatter_class = HelpFormatter  # after add_arguments: one choice for every command
        for action in p._actions:  # argparse only expands help texts that exist: give the bare options one
            if action.help is None and action.default not in (None, argparse.SUPPRESS) and action.option_strings:
                action.help = "default: %(default)s"
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
    command = next(name for name, (module, _) in COMMANDS.items() if module == args._module)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print(f"openrlhf-passk {command}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            return _runtime_error(command, exc)
        print(
            f"openrlhf-passk {command}: error: this command needs {exc.name}, part of the '{extra}' extra: "
            f"pip install 'openrlhf-passk[{extra}]'",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:  # a command's own checks print and return 2 or 1; this is the last resort
        return _runtime_error(command, exc)


def _runtime_error(command: str, exc: BaseException) -> int:
    if env.env_flag(DEBUG_ENV):
        raise exc
    print(
        f"openrlhf-passk {command}: error: {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
