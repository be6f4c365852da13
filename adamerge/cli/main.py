"""The ``adamerge`` command's entry point: dispatches to fit (LightningCLI), merge, evaluate, pick and sweep, and turns
every user-input error into one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from adamerge.cli.app import lightning_main, merge_main, quiet_libraries
from adamerge.cli.guide import COMMANDS, fit_help, top_help, unknown_command
from adamerge.cli.init import init_main, pairs
from adamerge.cli.keys import check_config_files
from adamerge.cli.sweep import sweep_main


def evaluate_main(args: list[str] | None = None):
    """``adamerge evaluate``: per-task accuracy (and macro-F1) of an exported checkpoint on labelled data."""
    from jsonargparse import CLI

    from adamerge.evaluate import evaluate_checkpoint

    return CLI(evaluate_checkpoint, args=task_pairs(list(args or [])), as_positional=False)


def task_pairs(args: list[str]) -> list[str]:
    """``--tasks a=PATH b=PATH`` (as ``adamerge init`` takes them) as the mapping ``--tasks`` reads; a JSON or YAML
    mapping passes through."""
    if "--tasks" not in args:
        return args
    i = args.index("--tasks") + 1
    j = i
    while j < len(args) and not args[j].startswith("--"):
        j += 1
    values = args[i:j]
    if not values or not all("=" in v and not v.lstrip().startswith("{") for v in values):
        return args
    tasks = {task: {"path": path} for task, path in pairs(values, "--tasks").items()}
    return [*args[:i], json.dumps(tasks), *args[j:]]


def pick_main(args: list[str] | None = None):
    """``adamerge pick A B ... [--into DIR]``: the export whose label-free selection score is best (see
    :mod:`adamerge.pick`)."""
    import argparse

    from adamerge.pick import pick

    parser = argparse.ArgumentParser(
        prog="adamerge pick",
        description="choose among exports by their label-free "
        "selection score (agreement with the experts on the same held-back rows)",
    )
    parser.add_argument("exports", nargs="+", help="exported checkpoints trained with SelectStep")
    parser.add_argument("--into", default=None, help="copy the chosen export here (manifest: a `pick` entry)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --into directory")
    a = parser.parse_args(args)
    return pick(a.exports, into=a.into, overwrite=a.overwrite)


def check_install(package=None) -> None:
    """Refuse to run on an ``adamerge`` that is not this package — e.g. a folder named ``adamerge`` (a clone's root)
    in the working directory, which Python imports as a namespace package: training would run and the export fail.
    """
    from adamerge.errors import MergeInputError

    if package is None:
        package = sys.modules.get("adamerge")  # imported already: this module is inside it
    here = Path(__file__).resolve().parent.parent
    if (
        getattr(package, "__version__", None) is None
        or getattr(package, "__file__", None) is None
        or Path(package.__file__).resolve().parent != here
    ):
        where = ", ".join(str(p) for p in getattr(package, "__path__", [])) or "?"
        raise MergeInputError(
            f"`import adamerge` finds {where}, not the installed package at {here} (a folder "
            "named adamerge in the current directory shadows it); run from another directory"
        )


def user_error(exc: BaseException | None) -> BaseException | None:
    """The user-input error behind ``exc`` — a :class:`MergeInputError` (also when jsonargparse wrapped it while
    instantiating the config) or Lightning's ``MisconfigurationException`` (bad Trainer arguments) — else None."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from adamerge.errors import MergeInputError

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (MergeInputError, MisconfigurationException)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    """Every user-input error ends the command with one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()

    from_sys = argv is None
    argv = list(sys.argv[1:] if from_sys else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(top_help())
        return
    command, rest = argv[0], argv[1:]
    try:
        check_install()
        if command not in COMMANDS:
            raise unknown_command(command)
        if command == "fit" and any(a in ("-h", "--help") for a in rest):
            print(fit_help())
            return
        if command in ("fit", "merge") and "--help-all" not in rest:
            check_config_files(command, rest)
        rest = ["--help" if a == "--help-all" else a for a in rest]
        if command == "merge":
            merge_main(rest)
        elif command == "fit":
            lightning_main(["fit", *rest])
        else:
            result = {"evaluate": evaluate_main, "pick": pick_main, "sweep": sweep_main, "init": init_main}[command](
                rest
            )
            if isinstance(result, str):  # a config (init): the command's output, as it is
                sys.stdout.write(result)
            elif result is not None:
                print(json.dumps(result, indent=2))  # the command's output, not logging
    except Exception as e:
        cause = user_error(e)
        if cause is None:
            raise
        message = "; ".join(line.strip() for line in str(cause).splitlines() if line.strip())
        logging.getLogger("adamerge").error("%s", message or type(cause).__name__)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
