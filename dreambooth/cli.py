"""The `dreambooth` command: a table from subcommand names to plain functions.

Each function lives in ``dreambooth/commands/`` and is imported only when its command runs.
Its typed keyword arguments are its flags and its docstring is its help (``Args:`` lines give
per-flag help). Adding a command is one row in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import typing

COMMANDS: dict[str, str] = {
    "data": "dreambooth.commands.data:data",
    "tokens": "dreambooth.commands.tokens:tokens",
    "plan": "dreambooth.commands.plan:plan",
    "train": "dreambooth.commands.train:train",
    "demo": "dreambooth.commands.demo:demo",
    "world": "dreambooth.commands.world:world",
    "eval": "dreambooth.commands.evaluate:eval_run",
    "report": "dreambooth.commands.evaluate:report",
    "bench": "dreambooth.commands.bench:bench",
    "sample": "dreambooth.commands.sample:sample",
    "sweep": "dreambooth.commands.sweep:sweep",
    "export": "dreambooth.commands.export:export",
    "ui": "dreambooth.commands.ui:ui",
}

# Parameter names that cannot be spelled as the flag users expect.
FLAG_NAMES = {"class_noun": "class", "overrides": "set"}


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _arg_help(doc: str) -> dict[str, str]:
    """Parse 'name: text' lines under an 'Args:' heading of a docstring."""
    helps, in_args = {}, False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped == "Args:":
            in_args = True
            continue
        if in_args and ":" in stripped:
            name, _, text = stripped.partition(":")
            if name.isidentifier():
                helps[name] = text.strip()
    return helps


def _summary(doc: str) -> str:
    return doc.split("Args:")[0].strip()


def add_command(sub: argparse._SubParsersAction, name: str, fn) -> None:
    doc = inspect.getdoc(fn) or ""
    parser = sub.add_parser(
        name,
        help=_summary(doc).splitlines()[0] if doc else None,
        description=_summary(doc),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    helps = _arg_help(doc)
    hints = typing.get_type_hints(fn)
    for pname, param in inspect.signature(fn).parameters.items():
        hint = hints.get(pname, str)
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
            hint = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(hint), typing.get_args(hint)
        kwargs: dict = {"help": helps.get(pname)}
        if param.default is inspect.Parameter.empty:
            parser.add_argument(pname, type=hint, **kwargs)
            continue
        flag = "--" + FLAG_NAMES.get(pname, pname).replace("_", "-")
        kwargs["dest"] = pname
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = param.default
        elif origin is list:
            kwargs.update(action="append", type=args[0] if args else str, default=None)
        else:
            kwargs.update(type=hint, default=param.default)
        parser.add_argument(flag, **kwargs)
    parser.set_defaults(_fn=fn)


def build_parser(names: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dreambooth",
        description="Teach a diffusion model one new subject from a handful of photos.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in names or COMMANDS:
        add_command(sub, name, _load(COMMANDS[name]))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: models are local
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # ours are enough
    from dreambooth.errors import DreamboothError

    # Import only the command that runs, so `dreambooth data` does not load torch.
    chosen = [a for a in argv if a in COMMANDS][:1] if argv and argv[0] in COMMANDS else None
    parser = build_parser(chosen)
    args = parser.parse_args(argv)
    if not hasattr(args, "_fn"):
        parser.print_help()
        return 0 if not argv else 2
    kwargs = {k: v for k, v in vars(args).items() if k != "_fn"}
    try:
        code = args._fn(**kwargs)
    except DreamboothError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the machine's answer (permissions, a full disk, a vanished file), not a bug
        where = f" {e.filename}" if e.filename else ""
        print(f"error:{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
