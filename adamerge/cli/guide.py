"""What ``adamerge --help`` and ``adamerge fit --help`` print: every subcommand in one line each, and fit's own
settings (model, data, export) first and short, with Lightning's Trainer flags behind a pointer."""

from __future__ import annotations

import difflib
import inspect

from adamerge.errors import MergeInputError

COMMANDS = {
    "init": "check your models and print a config for them (the recommended recipe): adamerge init --help",
    "fit": "train a merge on unlabeled data and export it: adamerge fit --config merge.yaml",
    "merge": "a data-free merge (Task Arithmetic, TIES, TSV-M, ...), exported: adamerge merge --config ties.yaml",
    "evaluate": "per-task accuracy and macro-F1 of an export or a model on labelled data",
    "sweep": "one fit per setting (e.g. the learning rate), the best label-free score kept",
    "pick": "choose among exports by their label-free selection score",
}


def top_help() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: adamerge <command> [options]",
        "",
        "Merge models fine-tuned from one base by training only the merge coefficients on unlabeled data.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "`adamerge <command> --help` describes each; errors: docs/errors.md."]
    return "\n".join(lines)


def unknown_command(name: str) -> MergeInputError:
    close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.5)
    hint = f"; did you mean `adamerge {close[0]}`?" if close else ""
    return MergeInputError(f"unknown command {name!r}{hint} (commands: {', '.join(COMMANDS)}; adamerge --help)")


def plain(text: str) -> str:
    """Docstring text for a terminal: reST roles and double backticks dropped, white space folded."""
    import re

    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return " ".join(text.replace("``", "").split())


def first_sentence(text: str) -> str:
    import re

    return re.split(r"(?<=[a-z0-9)\]])\. (?=[A-Z(])", plain(text), maxsplit=1)[0].rstrip(".")


def summary(doc: str, limit: int = 90) -> str:
    """A class's one-line summary: the first sentence of its docstring, cut at a word before ``limit``."""
    text = first_sentence(doc.split("\n\n")[0])
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " …"


def _arguments(cls, skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """``(name, first sentence of its docstring description)`` of ``cls``'s own arguments, in signature order."""
    from docstring_parser import parse

    doc = {p.arg_name: p.description or "" for p in parse(inspect.getdoc(cls) or "").params}
    params = inspect.signature(cls.__init__).parameters.values()
    return [(p.name, first_sentence(doc.get(p.name, ""))) for p in params
            if p.name not in ("self", *skip) and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]  # fmt: skip


def _row(name: str, text: str, width: int = 34) -> list[str]:
    import textwrap

    lines = textwrap.wrap(text, 118 - width - 3) or [""]
    return [f"  {name:<{width}} {lines[0]}", *(f"  {'':<{width}} {line}" for line in lines[1:])]


def _section(title: str, prefix: str, items: list[tuple[str, str]]) -> list[str]:
    lines = ["", title]
    for name, text in items:
        lines += _row(f"--{prefix}{name}", text)
    return lines


def fit_help() -> str:
    from adamerge.io.datasets import TaskData
    from adamerge.methods import METHODS, MergeModule
    from adamerge.training import ExportOnFitEnd, UnlabeledDataModule

    lines = [
        "usage: adamerge fit --config FILE [--section.key value ...]",
        "",
        "Train a merge on unlabeled data and export it (LightningCLI). A config is the easy way in: `adamerge init`",
        "writes one for your models. Any setting below can follow on the command line. An unset objective is",
        "entropy, the AdaMerging paper's; for fine-tunes that trained their own heads `adamerge init` writes the",
        "expert-guided recipe (objective: {name: kl}) instead: entropy collapses on such heads.",
        "",
        "methods (--model.class_path adamerge.methods.<Name>; a method's own settings: adamerge fit --model.help "
        "<Name>):",
    ]
    for cls in METHODS.values():
        lines += _row(cls.__name__, summary(inspect.getdoc(cls) or ""), 24)
    lines += _section("every method (--model.init_args.* also works):", "model.", _arguments(MergeModule))
    lines += _section("data (unlabeled rows per task):", "data.", _arguments(UnlabeledDataModule))
    lines += _section("each task's data:", "data.tasks.<task>.", _arguments(TaskData))
    lines += _section("export (written when training ends):", "export.", _arguments(ExportOnFitEnd))
    lines += [
        "",
        "trainer: every Lightning Trainer flag (--trainer.max_steps 500 --trainer.devices 4 ...), callbacks "
        "(adamerge.training.SelectStep, LRSchedule); all of them: adamerge fit --help-all",
    ]
    return "\n".join(lines)
