"""Choose among finished exports without labels: ``adamerge pick A B ... [--into DIR]``.

Each export trained with :class:`adamerge.training.SelectStep` records in its manifest the label-free score of the
step it exported (agreement with the experts on held-back unlabeled rows). Exports of the same base and fine-tunes,
scored by the same criterion on the same held-back rows, are comparable by that score: picking the best is the step
selection carried over several runs (another learning rate, objective or initialisation) — a hyperparameter choice
that reads no label. ``--into`` copies the chosen export, its manifest extended by a ``pick`` entry listing every
candidate. When the chosen value of a numeric hyperparameter that the candidates vary (the learning rate, say) is the
largest or the smallest tried, the record says so (``at_edge``): the best value may lie beyond the candidates.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from adamerge.checkpoint.card import CARD, write_card
from adamerge.errors import MergeInputError
from adamerge.io.manifest import MANIFEST, read_manifest
from adamerge.io.safetensors import atomic_directory

log = logging.getLogger(__name__)

# what makes two selection scores comparable: the same models, criterion and held-back rows
_SAME = {
    "base": lambda m: m["base"]["sha256"],
    "sources": lambda m: [(s["task"], s["sha256"]) for s in m["sources"]],
    "selection criterion": lambda m: m["selection"]["criterion"],
    "held-back rows (data: tasks, splits, seed, holdout, max_length)": lambda m: {
        k: m.get("data", {}).get(k) for k in ("tasks", "seed", "holdout", "max_length")
    },
}


def candidates(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Every export's selection (path, method, criterion, selected step, score), checked to be comparable."""
    if len(paths) < 2:
        raise MergeInputError(f"pick: give at least two exports, got {len(paths)}")
    manifests = []
    for path in paths:
        m = read_manifest(path)
        if "selection" not in m:
            raise MergeInputError(
                f"pick: export {path} records no label-free selection score; train it with the "
                "SelectStep callback and data.holdout"
            )
        if "holdout" not in m.get("data", {}):
            raise MergeInputError(
                f"pick: export {path} does not record which rows were held back (data.holdout); "
                "export it again with this version"
            )
        manifests.append(m)
    for what, key in _SAME.items():
        first = key(manifests[0])
        for path, m in zip(paths[1:], manifests[1:]):
            if key(m) != first:
                raise MergeInputError(f"pick: {paths[0]} and {path} differ in {what}: their scores are not comparable")
    return [
        {
            "path": str(path),
            "method": m["method"],
            "criterion": m["selection"]["criterion"],
            "selected_step": m["selection"]["selected_step"],
            "score": m["selection"]["score"],
            "hparams": m.get("hparams", {}),
        }
        for path, m in zip(paths, manifests)
    ]


def at_edge(settings: list[dict[str, Any]], chosen: int, scores: list[float] | None = None) -> dict[str, str]:
    """Each numeric hyperparameter that the candidates' ``settings`` vary (two or more distinct values, every
    candidate giving a number) whose chosen value is the largest or the smallest of them: ``{name: "largest" |
    "smallest"}``. A kept value at the edge of the candidates says the best one may lie beyond them — unless another
    candidate scored the same (``scores``): a tie shows no trend to follow."""
    if scores is not None and sum(v == scores[chosen] for v in scores) > 1:
        return {}
    edges = {}
    for name in settings[chosen]:
        values = [s.get(name) for s in settings]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) or len(set(values)) < 2:
            continue
        if values[chosen] == max(values):
            edges[name] = "largest"
        elif values[chosen] == min(values):
            edges[name] = "smallest"
    return edges


def best_of(scores: list[float]) -> int:
    """The index of the best score; ties go to the earlier candidate."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def pick(
    paths: list[str | Path],
    into: str | Path | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The export whose selected step scores best (ties: the earlier one); with ``into``, a copy of it there whose
    manifest adds ``pick: {criterion, chosen, at_edge, candidates, **extra}``. Returns that record."""
    found = candidates(paths)
    best = best_of([c["score"] for c in found])
    record = {
        "criterion": found[best]["criterion"],
        "chosen": found[best]["path"],
        "at_edge": at_edge([c["hparams"] for c in found], best, [c["score"] for c in found]),
        "candidates": found,
        **(extra or {}),
    }
    for name, side in record["at_edge"].items():
        log.warning(
            "pick: the chosen %s (%s) is the %s of the candidates' values: the best may lie beyond them; "
            "try further values",
            name,
            found[best]["hparams"][name],
            side,
        )
    if into is not None:
        if Path(into).resolve() in {Path(p).resolve() for p in paths}:
            raise MergeInputError(f"pick: --into {into} is one of the candidates")
        with atomic_directory(into, overwrite=overwrite) as tmp:
            shutil.copytree(found[best]["path"], tmp, dirs_exist_ok=True, symlinks=True)  # tasks/ link the root
            manifest = json.loads((tmp / MANIFEST).read_text())
            manifest["pick"] = record
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if (tmp / CARD).is_file():  # the model card says how it was chosen
                write_card(tmp)
    return record
