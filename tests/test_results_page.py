"""The results and findings pages: regenerated from the committed raw results byte for byte, within their sizes, and
the generator's marks checked by hand on a table of known figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402


@pytest.mark.parametrize("page", report.PAGES, ids=lambda p: p.name)
def test_the_page_is_what_its_raw_results_generate_byte_for_byte(page):
    text = page.read_text()
    assert "<!-- table " in text
    assert report.render(text) == text, f"{page.name} is stale: run python benchmarks/report.py"


def test_page_sizes_and_what_docs_holds():
    assert (ROOT / "docs" / "results.md").stat().st_size <= 40 * 1024
    assert (ROOT / "docs" / "findings.md").stat().st_size <= 30 * 1024
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert pages == ["errors.md", "findings.md", "guide.md", "results.md", "scaling.md"]
    assert not (ROOT / "docs" / "measured").exists()  # exploration data lives in git history


def test_every_stored_table_is_rendered_by_a_page():
    """No raw file lies unused, and every block names a stored file (or the rows table)."""
    named = {m["spec"].split()[0] for page in report.PAGES for m in report.BLOCK.finditer(page.read_text())} - {"rows"}
    stored = {p.stem for p in report.RESULTS.glob("*.json")}
    assert named == stored


def _table(rows: dict) -> dict:
    return {
        "kind": "benchmark",
        "preset": "quick",
        "section": "rows",
        "zoo_protocol": "own",
        "head_pooler": False,
        "steps": 100,
        "samples_per_task": 16,
        "tasks": ["a", "b"],
        "hardware": "test machine",
        "runs": [
            {"command": "python benchmarks/benchmark.py --preset quick", "commit": "abc1234", "date": "2026-12-07"}
        ],
        "rows": {k: {"label": k, "inductive": dict(zip(["a", "b"], v, strict=True))} for k, v in rows.items()},
    }


def test_averages_bold_first_best_merges_starred_and_missing_rows_dashed(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    figures = {
        "individual": (0.99, 0.99),  # a reference row: never starred, though highest
        "task_arithmetic": (0.80, 0.60),  # avg 70.0
        "ties": (0.70, 0.70),  # avg 70.0: ties with TA on the average, both starred
        "tsv_m": (0.65, 0.72),  # best on b
    }
    refused = "modules: no nn.Linear of Net matches ['a$', '\\\\.fc[12]$']; name the MLP layers"  # WEMoE on a CNN
    (tmp_path / "t.json").write_text(json.dumps({**_table(figures), "refused": {"wemoe": refused}}))
    text = report.render("<!-- table t rows=individual,task_arithmetic,ties,tsv_m,iso_c -->\n<!-- /table -->\n")
    lines = text.splitlines()
    assert lines[1].startswith("*`quick` preset, 2 tasks;") and "Device: test machine" in lines[1]
    assert "commit `abc1234`" in lines[2] and "`python benchmarks/benchmark.py --preset quick`" in lines[2]
    assert lines[3] == "*WEMoE refused this model: modules: no nn.Linear of Net matches […]; name the MLP layers.*"
    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == "| method | **avg** | a | b |"
    assert table[1:] == [
        "| Individual fine-tunes | **99.0** | 99.0 | 99.0 |",
        "| Task Arithmetic | **70.0** ★ | 80.0 ★ | 60.0 |",
        "| TIES | **70.0** ★ | 70.0 | 70.0 |",
        "| TSV-M | **68.5** | 65.0 | 72.0 ★ |",
        "| Iso-C | — | — | — |",
    ]


def test_a_changed_raw_figure_makes_the_committed_page_stale(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    for p in report.RESULTS.glob("*.json"):
        (results / p.name).write_text(p.read_text())
    page = tmp_path / "results.md"
    page.write_text((ROOT / "docs" / "results.md").read_text())
    monkeypatch.setattr(report, "RESULTS", results)
    monkeypatch.setattr(report, "PAGES", [page])
    assert report.main(["--check"]) == 0
    name = report.BLOCK.search(page.read_text().split("<!-- table rows -->")[1])["spec"].split()[0]
    raw = json.loads((results / f"{name}.json").read_text())
    row = next(iter(raw["rows"].values()))
    task = next(iter(row["inductive"]))
    row["inductive"][task] = row["inductive"][task] / 2
    (results / f"{name}.json").write_text(json.dumps(raw))
    assert report.main(["--check"]) == 1
    assert report.main([]) == 0 and report.main(["--check"]) == 0  # rewritten from the raw figures
    assert f"{100 * row['inductive'][task]:.1f}" in page.read_text()


def test_a_speed_run_carries_its_command_commit_and_date_into_the_caption(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    call = {"command": "BENCH_THREADS=2 python benchmarks/bench_speed.py --tasks 2", "commit": "abc1234", "date": "D"}
    cfg = {"step_peak_mib": 100.0, "device": "cpu", "T": 2}
    times = {"a": 10.0, "b": 12.0, "b-lean": 11.0, "c": 18.0}
    rows = [{k: {**cfg, "step_ms": ms} | ({"step_peak_mib": 400.0} if k == "c" else {}) for k, ms in times.items()}]
    source = tmp_path / "bench_speed.json"
    source.write_text(json.dumps({"shape": "minilm", "act": {}, "rows": rows, "runs": [call]}))
    report.add(source, "s", section="", speed=True, command=None)
    assert json.loads((tmp_path / "s.json").read_text())["runs"] == [call]
    lines = report.render("<!-- table s -->\n<!-- /table -->\n").splitlines()
    assert lines[2] == f"*Run D at commit `abc1234`: `{call['command']}`.*"
    assert lines[-2] == "| 2 | 10.0 | 12.0 | 18.0 | 1.20 | 1.50 | 100 | 400 | 0.25 |"
