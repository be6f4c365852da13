"""Train one merge at several settings and keep the best without labels: ``adamerge sweep``.

``adamerge sweep --config fit.yaml --grid model.init_args.lr=0.001,0.01 --out runs/lr [--extend 2] [-- FIT ARGS]``
runs ``adamerge fit`` once per value (each in its own process, so that a DDP run launches as it would alone), every
export written to ``<out>/<name>=<value>``, then :func:`adamerge.pick.pick` keeps the one whose selected step agrees
best with the experts on the held-back rows and copies it to ``<out>/best`` (``--into`` elsewhere). With
``--extend N``, while the kept value is the largest or the smallest tried, the next value beyond it on the grid's
own spacing (geometric for positive values: ``0.001, 0.01`` → ``0.1``) is trained too, at most N more times: the
rule "extend the grid past its kept edge" that a user would otherwise follow by hand. A candidate whose export is
already complete is not trained again, so a sweep stopped part-way resumes where it was (``<out>/sweep.json``
records the config's hash and the fit arguments, and another sweep into the same ``out`` is refused).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from itertools import product
from pathlib import Path
from typing import Any

from adamerge.errors import MergeInputError
from adamerge.io.manifest import MANIFEST
from adamerge.pick import at_edge, best_of, pick

log = logging.getLogger(__name__)


def parse_grid(
    specs: list[str], example: str = "model.init_args.lr=1e-3,1e-2", prefix: str = "sweep: "
) -> dict[str, list]:
    """``["model.init_args.lr=0.001,0.01"]`` → ``{"model.init_args.lr": [0.001, 0.01]}``; values are numbers where
    they read as one (``1e-3`` too), else YAML scalars (booleans, strings). Errors start with ``prefix`` and show
    ``example`` (the benchmark's keys are method arguments: ``lr=…``)."""
    grid: dict[str, list] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key or not values.strip():
            raise MergeInputError(f"{prefix}--grid {spec!r}: expected KEY=V1,V2,... (e.g. {example})")
        if key in grid:
            raise MergeInputError(f"{prefix}--grid names {key} twice")
        parsed = [_scalar(v.strip()) for v in values.split(",")]
        if len(set(map(repr, parsed))) != len(parsed):
            raise MergeInputError(f"{prefix}--grid {key}: a value is repeated ({values})")
        grid[key] = parsed
    if not grid:
        raise MergeInputError(f"{prefix}give at least one --grid KEY=V1,V2,...")
    if len(list(product(*grid.values()))) < 2:
        raise MergeInputError(f"{prefix}the grid has one candidate; give at least two values")
    return grid


def _scalar(text: str) -> Any:
    import yaml

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def short(key: str) -> str:
    """The name a setting goes by in directory names and records: the key's last part (``lr``)."""
    return key.rsplit(".", 1)[-1]


def candidate_name(values: dict[str, Any]) -> str:
    return ",".join(f"{short(k)}={v}" for k, v in values.items())


def next_value(values: list, side: str) -> float | int:
    """The value one step beyond the ``side`` ("largest" / "smallest") of ``values`` on their own spacing: the ratio
    of the two outermost values where both are positive (a log grid: 1e-3, 1e-2 → 1e-1), else their difference;
    integers stay integers (and move by at least 1)."""
    ordered = sorted(set(values))
    if len(ordered) < 2:
        raise MergeInputError("sweep: extending needs at least two distinct values")
    inner, outer = (ordered[-2], ordered[-1]) if side == "largest" else (ordered[1], ordered[0])
    nxt = outer * (outer / inner) if inner > 0 and outer > 0 else outer + (outer - inner)
    if all(isinstance(v, int) for v in values):
        step = 1 if side == "largest" else -1
        nxt = int(round(nxt))
        return nxt if nxt != outer else outer + step
    return float(f"{nxt:.6g}")


def search(
    grid: dict[str, list], score: Callable[[dict[str, Any]], float], extend: int = 0, label: str = "sweep"
) -> tuple[list[tuple[dict[str, Any], float]], int]:
    """Score every combination of ``grid`` in order (``score(values)`` trains one candidate), then, while fewer than
    ``extend`` values were added and the best (ties: the earlier) holds the largest or smallest value of the first
    setting with no other candidate scoring the same, append :func:`next_value` to that setting in ``grid`` (in
    place) and score the new combinations. Returns every ``(values, score)`` in the order scored, and how many
    values were added. ``adamerge sweep`` and the benchmark's swept rows both search this way."""
    tried: list[tuple[dict[str, Any], float]] = []
    key, added = next(iter(grid)), 0
    while True:
        for combo in product(*grid.values()):
            values = dict(zip(grid, combo))
            if all(values != done for done, _ in tried):
                tried.append((values, score(values)))
        if added >= extend:
            return tried, added
        scores = [s for _, s in tried]
        side = at_edge([{short(k): v for k, v in values.items()} for values, _ in tried], best_of(scores), scores).get(
            short(key)
        )
        if side is None:
            return tried, added
        grid[key].append(next_value(grid[key], side))
        added += 1
        log.info("%s: the kept %s is the %s tried; training %s next", label, short(key), side, grid[key][-1])


def _arg(key: str, value: Any) -> str:
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def check_config(config: str, extra: list[str], first: dict[str, Any]) -> None:
    """Refuse before training anything when the runs could not be compared: the config (with the first candidate's
    values) must parse, use ``SelectStep`` and hold rows back (``data.holdout``)."""
    from adamerge.cli.app import parse_only

    cfg = parse_only(config, [*extra, *[_arg(k, v) for k, v in first.items()]])
    callbacks = cfg.get("trainer", {}).get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    if not any(str(getattr(c, "class_path", "")).endswith("SelectStep") for c in callbacks):
        raise MergeInputError(
            f"sweep: {config} trains without the SelectStep callback: its exports would record no "
            "label-free score to choose by (add adamerge.training.SelectStep to trainer.callbacks)"
        )
    if not (cfg.get("data", {}) or {}).get("holdout"):
        raise MergeInputError(f"sweep: {config} holds no rows back (data.holdout): SelectStep has nothing to score on")


def same_sweep(out: Path, config: str, extra: list[str]) -> None:
    """Candidates are reused only by a sweep of the same config file (its content) and fit arguments: the first
    sweep into ``out`` records them in ``out/sweep.json``; another refuses to mix its runs with those."""
    import hashlib

    this = {"config_sha256": hashlib.sha256(Path(config).read_bytes()).hexdigest(), "fit_args": extra}
    record = out / "sweep.json"
    if record.is_file():
        before = json.loads(record.read_text())
        if {k: before.get(k) for k in this} != this:
            raise MergeInputError(
                f"sweep: {out} holds the candidates of another sweep (its config {before.get('config')}"
                f" or fit arguments {before.get('fit_args')} differ from this one's); use another "
                "--out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"config": str(Path(config).resolve()), **this}, indent=2) + "\n")


def train(config: str, extra: list[str], values: dict[str, Any], out: Path) -> Path:
    """One candidate's ``adamerge fit`` in its own process, exported to ``out``; an export already complete there
    (a manifest with a selection) is kept as it is."""
    manifest = out / MANIFEST
    if manifest.is_file() and "selection" in json.loads(manifest.read_text()):
        log.info("sweep: %s is already exported at %s; not trained again", candidate_name(values), out)
        return out
    cmd = [
        sys.executable,
        "-m",
        "adamerge",
        "fit",
        "--config",
        config,
        *extra,
        *[_arg(k, v) for k, v in values.items()],
        f"--export.output_dir={out}",
    ]
    log.info("sweep: training %s: %s", candidate_name(values), " ".join(cmd[2:]))
    code = subprocess.run(cmd).returncode
    if code != 0:
        kind = MergeInputError if code == 2 else RuntimeError
        raise kind(
            f"sweep: candidate {candidate_name(values)} failed (adamerge fit exit status {code}; its error is "
            f"above); the candidates exported so far stay under {out.parent}"
        )
    return out


def sweep(
    config: str,
    grid: dict[str, list],
    out: str | Path,
    extend: int = 0,
    into: str | Path | None = None,
    extra: list[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train every combination of ``grid`` (and up to ``extend`` further values past a kept edge), keep the export
    with the best label-free selection score, copy it to ``into`` (default ``<out>/best``). Returns the pick record
    with a ``sweep`` entry: the grid as finally tried and how many values the extension added."""
    extra = list(extra or [])
    if not Path(config).is_file():
        raise MergeInputError(f"sweep: --config {config} is not a file")
    names = [short(k) for k in grid]
    if len(set(names)) != len(names):
        raise MergeInputError(
            f"sweep: --grid keys {', '.join(grid)} end in the same name; the candidates' names "
            "would not tell them apart"
        )
    if extend and len(grid) != 1:
        raise MergeInputError(
            f"sweep: --extend follows one setting past its kept edge; the grid varies {len(grid)} ({', '.join(grid)})"
        )
    if extend and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in next(iter(grid.values()))):
        raise MergeInputError(f"sweep: --extend needs numeric values of {next(iter(grid))}")
    out = Path(out)
    into = Path(into) if into is not None else out / "best"
    if into.exists() and not overwrite:
        raise MergeInputError(f"sweep: {into} already exists; pass --overwrite to replace it")
    grid = {k: list(v) for k, v in grid.items()}
    check_config(config, extra, {k: v[0] for k, v in grid.items()})
    same_sweep(out, config, extra)

    def score(values: dict[str, Any]) -> float:
        path = train(config, extra, values, out / candidate_name(values))
        return json.loads((path / MANIFEST).read_text())["selection"]["score"]

    tried, added = search(grid, score, extend, "sweep")
    record = pick(
        [out / candidate_name(values) for values, _ in tried],
        into=into,
        overwrite=overwrite,
        extra={"sweep": {"grid": grid, "extended": added}},
    )
    if record["at_edge"] and extend:
        log.warning("sweep: after %d extension(s) the kept value is still at the edge of the grid", added)
    return record


def sweep_main(args: list[str] | None = None):
    """``adamerge sweep --config C --grid KEY=V1,V2 --out DIR [--extend N] [-- FIT ARGS]``: one ``adamerge fit``
    per value, the best label-free selection score kept (see :mod:`adamerge.sweep`)."""
    import argparse

    from adamerge.cli.sweep import parse_grid, sweep
    from adamerge.errors import MergeInputError

    args = list(sys.argv[2:] if args is None else args)
    fit_args = args[args.index("--") + 1 :] if "--" in args else []
    args = args[: args.index("--")] if "--" in args else args
    parser = argparse.ArgumentParser(
        prog="adamerge sweep",
        description="train one merge at several settings, each exported with its label-free "
        "selection score, and keep the best (adamerge pick); arguments after -- go to every adamerge fit",
    )
    parser.add_argument("--config", required=True, help="an adamerge fit config using SelectStep and data.holdout")
    parser.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2,...",
        help="a fit setting and its values, e.g. model.init_args.lr=1e-3,1e-2 (repeatable: every "
        "combination is trained)",
    )
    parser.add_argument("--out", required=True, help="where each candidate is exported (<out>/<name>=<value>)")
    parser.add_argument(
        "--extend",
        type=int,
        default=0,
        metavar="N",
        help="while the kept value is the grid's largest or smallest, train the next value beyond it "
        "on the grid's spacing, at most N more (one numeric setting)",
    )
    parser.add_argument("--into", default=None, help="where the kept export is copied (default <out>/best)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --into directory")
    a = parser.parse_args(args)
    if a.extend < 0:
        raise MergeInputError(f"sweep: --extend must be >= 0, got {a.extend}")
    return sweep(
        a.config, parse_grid(a.grid), a.out, extend=a.extend, into=a.into, extra=fit_args, overwrite=a.overwrite
    )
