"""The model card (``README.md``) of an export: Hub front matter, method, sources, coefficients, data, results,
and the config that reproduces it — written from the export's manifest, so ``adamerge evaluate --write`` can
rewrite it with the evaluation results.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from adamerge.io.extensions import extensions_of
from adamerge.io.manifest import manifest_kind, read_manifest
from adamerge.kinds import get_kind

CARD = "README.md"
HEATMAP = "coefficients.png"
EVAL_RESULTS = "eval_results.json"


def heatmap_png(matrix, row_labels, title: str = "merge coefficients") -> bytes:
    """Render a ``[T, P]`` coefficient matrix as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, matrix.shape[1] * 0.08), 1 + 0.4 * matrix.shape[0]))
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("parameter tensor")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _hub_id(source: str) -> str | None:
    from adamerge.io.sources import names_local_path

    return None if names_local_path(source) else source


def base_model_id(manifest: dict[str, Any]) -> str:
    """The Hub id of the base: its source when that is a hub id, else the ``_name_or_path`` its config records when
    that is one (a local copy of a Hub model), else the local path as given."""
    source = str(manifest["base"]["source"])
    if _hub_id(source):
        return source
    config = Path(source) / "config.json"
    if config.is_file():
        recorded = json.loads(config.read_text()).get("_name_or_path")
        if recorded and _hub_id(str(recorded)):
            return str(recorded)
    return source


def coefficient_table(coefficients: dict[str, Any]) -> tuple[list[str], list[list[float]]]:
    """Columns and ``[task][column]`` values of a compact coefficient table: one column for task-wise coefficients,
    else the mean coefficient of each block (embeddings, each layer, ...) in model order."""
    from adamerge.core.modules import block_of

    effective, params, tasks = coefficients["effective"], coefficients["params"], coefficients["tasks"]
    if coefficients.get("granularity") == "task" or not params:
        return ["λ"], [[row[0] if row else float("nan")] for row in effective]
    blocks: dict[str, list[int]] = {}
    for j, p in enumerate(params):
        blocks.setdefault(block_of(p), []).append(j)
    cols = list(blocks)
    return cols, [[sum(effective[t][j] for j in blocks[c]) / len(blocks[c]) for c in cols] for t in range(len(tasks))]


def _front_matter(manifest: dict[str, Any]) -> str:
    import yaml

    meta = {
        "base_model": base_model_id(manifest),
        "tags": ["merge", "adamerge", f"adamerge-{manifest['method']}"],
        "library_name": "transformers",
        "pipeline_tag": get_kind(manifest_kind(manifest)).pipeline_tag,
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def render_card(manifest: dict[str, Any], eval_results: dict[str, Any] | None = None) -> str:
    """The card's text from an export's manifest (and its ``eval_results.json``, when evaluated)."""
    method = manifest["method"]
    tasks = [s["task"] for s in manifest.get("sources", [])]
    lines = [
        _front_matter(manifest),
        f"# {method} merge of {len(tasks)} fine-tunes\n",
        f"This model was merged with adamerge (method `{method}`) from the base `{manifest['base']['source']}` "
        f"and {len(tasks)} fine-tunes of it. No training data of the fine-tunes was used"
        + (", only unlabeled data for the coefficients (below)." if manifest.get("data") else "."),
        "",
    ]
    for section in (_use, _sources, _coefficients, _settings, _data):
        lines += section(manifest)
    lines += _evaluation(eval_results) if eval_results else []
    lines += _reproduce(manifest)
    return "\n".join(lines)


def _use(manifest: dict[str, Any]) -> list[str]:
    tasks = [s["task"] for s in manifest.get("sources", [])]
    repo = (manifest.get("hub") or {}).get("repo_id") or "<this repo>"
    lines = [
        "## Use\n",
        get_kind(manifest_kind(manifest)).card_usage(
            repo, tasks[0] if tasks else "<task>", bool(manifest.get("per_task_models"))
        ),
    ]
    if (manifest.get("head_options") or {}).get("pooler"):
        lines.append(
            "Each task's head keeps its fine-tune's own pooler (`heads: {pooler: true}`): classify with "
            "`tasks/<task>/`, which holds that task's pooler and classifier. The root's pooler is the "
            "merged one, which none of the heads was trained with: use the root for its features "
            "(`last_hidden_state`), not as the backbone of a task's classifier.\n"
        )
    if manifest.get("task_buffers"):
        lines.append(
            "Each task has BatchNorm statistics of its own (`task_buffers.safetensors`), re-estimated on its "
            "unlabeled rows under the merge: classify a task's rows with `tasks/<task>/` (which holds them) "
            "or `adamerge.load_merged(path).predict(task, ...)`. The root's statistics are those of every "
            "task's rows together: one model for rows of unknown task.\n"
        )
    for ext in extensions_of(manifest):  # what the method's export extension says about serving it
        lines.append(ext.card(manifest[ext.key]))
    weights = manifest.get("weights", {})
    if weights:
        shards = len([f for f in weights.get("files", []) if f.endswith(".safetensors")])
        lines.append(f"Weights are stored in `{weights.get('dtype')}` ({shards} safetensors file(s)).\n")
    return lines


def _sources(manifest: dict[str, Any]) -> list[str]:
    lines = [
        "## Sources\n",
        "| role | task | source | sha256 |\n| --- | --- | --- | --- |",
        f"| base | | `{manifest['base']['source']}` | `{manifest['base']['sha256'][:16]}…` |",
    ]
    for s in manifest.get("sources", []):
        lines.append(f"| fine-tune | {s['task']} | `{s['source']}` | `{s['sha256'][:16]}…` |")
    lines.append(
        "\nHashes are sha256 over every tensor's name, dtype, shape and bytes (full values in `merge_manifest.json`).\n"
    )
    return lines


def _coefficients(manifest: dict[str, Any]) -> list[str]:
    c = manifest.get("coefficients")
    if not c:
        return []
    cols, rows = coefficient_table(c)
    lines = [f"## Merge coefficients ({c.get('granularity')}-wise)\n"]
    if len(cols) > 1:
        lines.append(
            f"Mean coefficient per block; every tensor's value is in `merge_manifest.json`, the heatmap "
            f"in `{HEATMAP}`.\n"
        )
        lines.append(f"![merge coefficients]({HEATMAP})\n")
    lines.append("| task | " + " | ".join(cols) + " |\n|" + " --- |" * (len(cols) + 1))
    for task, row in zip(c["tasks"], rows):
        lines.append(f"| {task} | " + " | ".join(_fmt(v) for v in row) + " |")
    return [*lines, ""]


def _settings(manifest: dict[str, Any]) -> list[str]:
    """The prep, the method's own manifest fields (``settings``) and the run's label-free choices."""
    hidden = {ext.key for ext in extensions_of(manifest) if not ext.show_settings}
    keys = ("prep", *manifest.get("settings", ()), "selection", "lr_schedule", "pick")
    extra = {k: manifest[k] for k in dict.fromkeys(keys) if manifest.get(k) and k not in hidden}
    if not extra:
        return []
    return ["## Method settings\n", "```json\n" + json.dumps(_compact(extra), indent=2) + "\n```\n"]


def _data(manifest: dict[str, Any]) -> list[str]:
    data = manifest.get("data")
    if not data:
        return []
    lines = [
        "## Data used for adaptation\n",
        f"Unlabeled inputs only (labels never read), {data.get('samples_per_task')} rows per task, "
        f"truncated to {data.get('max_length')} tokens:\n",
        "| task | dataset | split |\n| --- | --- | --- |",
    ]
    for task, spec in data.get("tasks", {}).items():
        lines.append(f"| {task} | `{spec.get('path')}` | {spec.get('split')} |")
    return [*lines, ""]


def _evaluation(eval_results: dict[str, Any]) -> list[str]:
    scores = eval_results.get("scores", {})
    lines = ["## Evaluation\n"]
    if all("perplexity" in s for s in scores.values()):  # a causal LM: each task's text scored token by token
        lines.append(
            f"`adamerge evaluate` on each task's text (max_length {eval_results.get('max_length')}; "
            "mean next-token negative log-likelihood in nats, and its perplexity):\n"
        )
        lines.append("| task | NLL | perplexity |\n| --- | --- | --- |")
        lines += [f"| {task} | {s['nll']:.4f} | {s['perplexity']:.2f} |" for task, s in scores.items()]
    else:
        lines.append(f"`adamerge evaluate` on labelled data (max_length {eval_results.get('max_length')}):\n")
        lines.append("| task | accuracy | macro-F1 |\n| --- | --- | --- |")
        lines += [f"| {task} | {_fmt(s['accuracy'])} | {_fmt(s['macro_f1'])} |" for task, s in scores.items()]
    return [*lines, ""]


def _reproduce(manifest: dict[str, Any]) -> list[str]:
    lines = ["## Reproduce\n"]
    if manifest.get("config"):
        command = "fit" if "trainer" in manifest["config"] else "merge"
        lines.append(f"`adamerge {command} --config config.yaml` with this config:\n")
        lines.append("```yaml\n" + manifest["config"].rstrip() + "\n```\n")
    else:
        lines.append("Exported from Python; the method and its settings are in `merge_manifest.json`.\n")
    v = manifest.get("versions", {})
    lines.append(
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + f"; created {manifest.get('created')}.\n"
    )
    return lines


def _compact(obj, depth: int = 0):
    """Long lists (e.g. a selection history) shortened for the card; the manifest keeps them whole."""
    if isinstance(obj, dict):
        return {k: _compact(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list) and len(obj) > 8:
        return [*obj[:4], f"... {len(obj) - 8} more ...", *obj[-4:]]
    return obj


def write_card(directory: str | Path) -> Path:
    """(Re)write ``README.md`` (and ``coefficients.png`` for layer-wise coefficients) of an export from its manifest
    and ``eval_results.json``; the card is replaced atomically."""

    directory = Path(directory)
    manifest = read_manifest(directory)
    results = directory / EVAL_RESULTS
    eval_results = json.loads(results.read_text()) if results.is_file() else None
    c = manifest.get("coefficients")
    if c and coefficient_table(c)[0] != ["λ"]:
        import numpy as np

        png = heatmap_png(np.asarray(c["effective"], dtype=float), c["tasks"], f"{manifest['method']} coefficients")
        _atomic_write(directory / HEATMAP, png)
    _atomic_write(directory / CARD, render_card(manifest, eval_results).encode())
    return directory / CARD


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
