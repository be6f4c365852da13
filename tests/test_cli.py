"""The `adamerge` command end to end on the tiny zoo: fit with W&B offline, merge, evaluate; config files parse."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import yaml

from adamerge.cli.app import lightning_main, parse_only
from adamerge.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def fit_config(zoo, task_data, tmp_path, **model_args):
    base, paths = zoo
    return {
        "seed_everything": 0,
        "model": {
            "class_path": "adamerge.methods.AdaMerging",
            "init_args": {"base": base, "models": paths, "granularity": "layer", **model_args},
        },
        "data": {"tasks": {t: {"path": p} for t, p in task_data.items()}, "samples_per_task": 4, "max_length": 16},
        "trainer": {
            "max_steps": 6,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "logger": {
                "class_path": "pytorch_lightning.loggers.WandbLogger",
                "init_args": {"offline": True, "project": "adamerge-test", "save_dir": str(tmp_path / "wandb")},
            },
        },
        "export": {"output_dir": str(tmp_path / "merged")},
    }


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a non-local socket fails the test."""
    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (
            host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")
        ):
            raise AssertionError(f"network access attempted: {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def test_each_run_keeps_its_own_config_and_heatmap(zoo, task_data, tmp_path):
    """Two runs of one config with a versioned logger: each version folder has its own config.yaml (with that
    run's max_steps) and coefficients.png; nothing lands in the shared save_dir."""
    for i, steps in enumerate((1, 2)):
        cfg = fit_config(zoo, task_data, tmp_path)
        cfg["trainer"].update(
            max_steps=steps,
            logger={
                "class_path": "pytorch_lightning.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "logs")},
            },
        )
        cfg["export"] = {"output_dir": str(tmp_path / f"merged{i}")}
        if i:
            cfg["model"]["init_args"]["batchnorm_statistics"] = "running"
        p = tmp_path / "fit.yaml"
        p.write_text(yaml.safe_dump(cfg))
        cli = lightning_main(["fit", "--config", str(p)])
        assert cli.model.batchnorm_statistics == ("running" if i else "batch")  # the option reaches the model
    for i, steps in enumerate((1, 2)):
        run = tmp_path / "logs" / f"version_{i}"
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["trainer"]["max_steps"] == steps
        assert saved["model"]["init_args"]["batchnorm_statistics"] == ("running" if i else "batch")
        assert (run / "coefficients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["version_0", "version_1"]
    assert not (tmp_path / "config.yaml").exists()


def test_fit_trains_exports_and_logs_heatmap_offline(zoo, task_data, tmp_path, no_network, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(yaml.safe_dump(fit_config(zoo, task_data, tmp_path)))
    cli = lightning_main(["fit", "--config", str(cfg)])
    coef = cli.model.merged.coefficients.weight.detach()
    assert cli.trainer.global_step == 6
    assert (coef - 0.3).abs().max() > 1e-4  # coefficients moved
    manifest = json.loads((tmp_path / "merged" / "merge_manifest.json").read_text())
    assert manifest["method"] == "adamerging"
    assert torch.allclose(torch.tensor(manifest["coefficients"]["values"]), coef)
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    images = list(runs[0].glob("files/media/images/coefficients_*.png"))
    assert images, "heatmap image missing from the offline W&B run"
    # the run's config and heatmap in the run's own folder, not the logger's shared save_dir
    assert (runs[0] / "coefficients.png").stat().st_size > 1000
    saved = yaml.safe_load((runs[0] / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 6 and saved["export"]["output_dir"] == str(tmp_path / "merged")
    assert not (tmp_path / "wandb" / "coefficients.png").exists() and not (tmp_path / "wandb" / "config.yaml").exists()
    card = (tmp_path / "merged" / "README.md").read_text()  # the model card: the run's config and data, no rows
    config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert config["trainer"]["max_steps"] == 6 and config["model"]["init_args"]["granularity"] == "layer"
    assert "adamerge fit --config" in card and "## Data used for adaptation" in card
    for task, path in task_data.items():
        assert f"| {task} | `{path}` |" in card
    assert "4 rows per task" in card and "good movie" not in card


def test_fit_refuses_existing_output_dir_before_training(zoo, task_data, tmp_path):
    (tmp_path / "merged").mkdir()
    cfg = fit_config(zoo, task_data, tmp_path)
    cfg["trainer"]["logger"] = False
    p = tmp_path / "fit.yaml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(p)])
    assert e.value.code == 2
    assert list((tmp_path / "merged").iterdir()) == []


@pytest.mark.parametrize(
    "method,args",
    [
        ("TaskArithmetic", {"scale": 0.3}),
        ("Ties", {"prep": {"ties_density": 0.2}}),
        ("Average", {}),
        ("M3", {"alpha": 0.5, "seed": 3}),
    ],
)
def test_merge_command_exports_each_data_free_method(zoo, tmp_path, method, args):
    base, paths = zoo
    cfg = {
        "model": {"class_path": f"adamerge.methods.{method}", "init_args": {"base": base, "models": paths, **args}},
        "output_dir": str(tmp_path / "out"),
        "per_task_models": False,
    }
    p = tmp_path / "merge.yaml"
    p.write_text(yaml.safe_dump(cfg))
    main(["merge", "--config", str(p)])
    manifest = json.loads((tmp_path / "out" / "merge_manifest.json").read_text())
    assert manifest["method"] == method.lower().replace("taskarithmetic", "task_arithmetic")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "heads.safetensors").is_file()


def test_evaluate_command_reports_accuracy(zoo, task_data, tmp_path, capsys):
    base, paths = zoo
    cfg = {
        "model": {"class_path": "adamerge.methods.TaskArithmetic", "init_args": {"base": base, "models": paths}},
        "output_dir": str(tmp_path / "out"),
    }
    p = tmp_path / "merge.yaml"
    p.write_text(yaml.safe_dump(cfg))
    main(["merge", "--config", str(p)])
    tasks = {"sentiment": {"path": task_data["sentiment"]}, "spam": {"path": task_data["spam"]}}
    main(["evaluate", "--checkpoint", str(tmp_path / "out"), "--tasks", json.dumps(tasks)])
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"sentiment", "spam", "average"}
    assert 0.0 <= result["sentiment"]["accuracy"] <= 1.0 and result["sentiment"]["n"] == 40


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT / "configs"))
)
def test_every_config_parses(path):
    cfg = parse_only(path)
    assert cfg.model.class_path.startswith("adamerge.methods.")


def test_m3_best_of_k_by_entropy_records_draws_and_choice(zoo, task_data, tmp_path):
    base, paths = zoo
    cfg = {
        "model": {
            "class_path": "adamerge.methods.M3",
            "init_args": {"base": base, "models": paths, "alpha": 0.5, "seed": 5, "candidates": 4},
        },
        "data": {"tasks": {t: {"path": p} for t, p in task_data.items()}, "samples_per_task": 4, "max_length": 16},
        "output_dir": str(tmp_path / "out"),
        "per_task_models": False,
    }
    p = tmp_path / "m3.yaml"
    p.write_text(yaml.safe_dump(cfg))
    main(["merge", "--config", str(p)])
    m3 = json.loads((tmp_path / "out" / "merge_manifest.json").read_text())["m3"]
    assert len(m3["draws"]) == 4 and m3["distribution"] == "dirichlet"
    scores = m3["entropy_scores"]
    assert len(scores) == 4 and m3["chosen"] == scores.index(min(scores))
    assert m3["weights"] == m3["draws"][m3["chosen"]]
    # without data the best-of-K variant refuses to guess
    del cfg["data"]
    cfg["output_dir"] = str(tmp_path / "out2")
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):
        main(["merge", "--config", str(p)])
    assert not (tmp_path / "out2").exists()


def test_fit_with_label_free_selection_exports_the_chosen_step(zoo, task_data, tmp_path):
    """The guided config's shape through the command: KL objective, tuned heads, SelectStep on held-back rows."""
    cfg = fit_config(zoo, task_data, tmp_path, objective="kl", tune_heads=True, lr=0.05)
    cfg["trainer"]["logger"] = False
    cfg["trainer"]["callbacks"] = [
        {"class_path": "adamerge.training.SelectStep", "init_args": {"every_n_steps": 2, "criterion": "agreement"}},
        {"class_path": "adamerge.training.LRSchedule", "init_args": {"kind": "cosine", "warmup_steps": 1}},
    ]
    cfg["data"]["holdout"] = 8
    p = tmp_path / "fit.yaml"
    p.write_text(yaml.safe_dump(cfg))
    cli = lightning_main(["fit", "--config", str(p)])
    manifest = json.loads((tmp_path / "merged" / "merge_manifest.json").read_text())
    sel = manifest["selection"]
    assert [h[0] for h in sel["history"]] == [0, 2, 4, 6]
    assert sel["selected_step"] == max(sel["history"], key=lambda h: h[1])[0]
    assert manifest["hparams"]["objective"]["name"] == "kl" and manifest["hparams"]["tune_heads"] is True
    assert manifest["lr_schedule"] == {
        "kind": "cosine",
        "warmup_steps": 1,
        "final_fraction": 0.0,
        "total_steps": cfg["trainer"]["max_steps"],
    }
    exported = torch.tensor(manifest["coefficients"]["values"])
    assert torch.allclose(exported, cli.model.merged.coefficients.weight.detach())


def test_pick_chooses_the_export_with_the_best_selection_score(zoo, task_data, tmp_path, capsys, caplog):
    """Two learning rates through `adamerge fit` with SelectStep, then `adamerge pick`: it names the export whose
    recorded score is highest, copies it whole with a `pick` entry, and refuses exports whose scores are not
    comparable (another criterion, other held-back rows, no selection)."""
    outs = {}
    for name, lr, extra in (
        ("a", 0.001, {}),
        ("b", 0.2, {}),
        ("worst", 0.2, {"criterion": "worst_agreement"}),
        ("seed", 0.2, {"seed": 1}),
    ):
        cfg = fit_config(zoo, task_data, tmp_path / name, objective="kl", lr=lr)
        cfg["trainer"]["max_steps"] = 4
        cfg["trainer"]["logger"] = False
        cfg["trainer"]["callbacks"] = [
            {
                "class_path": "adamerge.training.SelectStep",
                "init_args": {"every_n_steps": 2, "criterion": extra.get("criterion", "agreement")},
            }
        ]
        cfg["data"]["holdout"] = 8
        cfg["data"]["seed"] = extra.get("seed", 0)
        (tmp_path / name).mkdir()
        p = tmp_path / name / "fit.yaml"
        p.write_text(yaml.safe_dump(cfg))
        lightning_main(["fit", "--config", str(p)])
        outs[name] = tmp_path / name / "merged"
    scores = {n: json.loads((outs[n] / "merge_manifest.json").read_text())["selection"]["score"] for n in ("a", "b")}
    assert json.loads((outs["a"] / "merge_manifest.json").read_text())["data"]["holdout"] == 8
    capsys.readouterr()
    main(["pick", str(outs["a"]), str(outs["b"]), "--into", str(tmp_path / "best")])
    record = json.loads(capsys.readouterr().out)
    winner = "b" if scores["b"] > scores["a"] else "a"  # ties: the first
    assert record["chosen"] == str(outs[winner])
    assert [c["score"] for c in record["candidates"]] == [scores["a"], scores["b"]]
    assert [c["hparams"]["lr"] for c in record["candidates"]] == [0.001, 0.2]
    # two rates: the kept one is the larger or the smaller, and the record (and a warning) say so -- unless the two
    # scored the same (no trend)
    side = {} if scores["a"] == scores["b"] else {"lr": "largest" if winner == "b" else "smallest"}
    assert record["at_edge"] == side
    assert (
        (f"the chosen lr ({0.2 if winner == 'b' else 0.001}) is the {side['lr']}" in caplog.text)
        if side
        else "the chosen lr" not in caplog.text
    )
    # a candidate that scored lower (its recorded score lowered by hand): the kept rate is now the edge of two
    # distinct scores, read from the manifests' hparams, recorded and warned about
    import shutil

    low = tmp_path / "low"
    shutil.copytree(outs["b"], low)
    manifest = json.loads((low / "merge_manifest.json").read_text())
    manifest["selection"]["score"] = scores["a"] - 0.25
    (low / "merge_manifest.json").write_text(json.dumps(manifest))
    caplog.clear()
    capsys.readouterr()
    main(["pick", str(outs["a"]), str(low)])
    edge = json.loads(capsys.readouterr().out)
    assert edge["chosen"] == str(outs["a"]) and edge["at_edge"] == {"lr": "smallest"}
    assert "the chosen lr (0.001) is the smallest of the candidates' values" in caplog.text
    picked = json.loads((tmp_path / "best" / "merge_manifest.json").read_text())
    assert picked["pick"] == record
    own = json.loads((outs[winner] / "merge_manifest.json").read_text())
    assert {k: v for k, v in picked.items() if k != "pick"} == own
    assert '"pick"' in (tmp_path / "best" / "README.md").read_text()  # the card says how it was chosen
    for f in (outs[winner]).iterdir():
        if f.name not in ("merge_manifest.json", "README.md") and f.is_file():
            assert (tmp_path / "best" / f.name).read_bytes() == f.read_bytes(), f.name
    # not comparable: nothing written
    for other, what in (("worst", "selection criterion"), ("seed", "held-back rows")):
        caplog.clear()
        with pytest.raises(SystemExit):
            main(["pick", str(outs["a"]), str(outs[other]), "--into", str(tmp_path / other / "x")])
        assert f"differ in {what}" in caplog.text, other
        assert not (tmp_path / other / "x").exists()
    from adamerge.errors import MergeInputError
    from adamerge.pick import pick

    with pytest.raises(MergeInputError, match="at least two"):
        pick([outs["a"]])
    with pytest.raises(MergeInputError, match="is one of the candidates"):
        pick([outs["a"], outs["b"]], into=outs["a"], overwrite=True)
    # an export without a recorded selection, or without the held-back rows it was scored on, is refused

    for drop, message in (
        ("selection", "records no label-free selection score"),
        ("data", "does not record which rows were held back"),
    ):
        bare = tmp_path / f"no-{drop}"
        shutil.copytree(outs["a"], bare)
        manifest = json.loads((bare / "merge_manifest.json").read_text())
        del manifest[drop]
        (bare / "merge_manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(MergeInputError, match=message):
            pick([outs["a"], bare])


def test_sweep_trains_each_value_keeps_the_best_score_and_extends_past_a_kept_edge(zoo, task_data, tmp_path, caplog):
    """`adamerge sweep`: one `adamerge fit` process per learning rate, each export carrying its value; the kept one is
    the best recorded selection score (read back from the manifests here); a kept value at the grid's edge adds the
    next value on the grid's log spacing (0.01, 0.1 -> 1.0 or 0.001) once (`--extend 1`); a second call trains
    nothing again; a config without SelectStep is refused before anything is trained."""
    cfg = fit_config(zoo, task_data, tmp_path, objective="kl")
    cfg["trainer"].update(
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        callbacks=[
            {"class_path": "adamerge.training.SelectStep", "init_args": {"every_n_steps": 2, "criterion": "agreement"}}
        ],
    )
    cfg["data"]["holdout"] = 8
    del cfg["export"]
    p = tmp_path / "fit.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sweep"
    caplog.set_level("INFO")
    main(
        [
            "sweep",
            "--config",
            str(p),
            "--grid",
            "model.init_args.lr=0.01,0.1",
            "--out",
            str(out),
            "--extend",
            "1",
            "--",
            "--trainer.max_steps=4",
        ]
    )
    made = sorted(d.name for d in out.iterdir() if (d / "merge_manifest.json").is_file() and d.name != "best")
    manifests = {d: json.loads((out / d / "merge_manifest.json").read_text()) for d in made}
    for d, m in manifests.items():  # each process trained with its own value
        assert m["hparams"]["lr"] == float(d.removeprefix("lr=")) and m["hparams"]["objective"]["name"] == "kl"
    score = {d: m["selection"]["score"] for d, m in manifests.items()}
    first = {d: score[d] for d in ("lr=0.01", "lr=0.1")}
    top = max(first.values())
    if list(first.values()).count(top) > 1:  # a tie shows no trend: nothing added
        expect_extra = None
    else:
        expect_extra = "lr=1.0" if first["lr=0.1"] > first["lr=0.01"] else "lr=0.001"
    assert made == sorted(["lr=0.01", "lr=0.1"] + ([expect_extra] if expect_extra else []))
    picked = json.loads((out / "best" / "merge_manifest.json").read_text())
    order = ["lr=0.01", "lr=0.1"] + ([expect_extra] if expect_extra else [])
    winner = max(order, key=lambda d: (score[d], -order.index(d)))
    assert picked["pick"]["chosen"] == str(out / winner)
    assert picked["selection"] == manifests[winner]["selection"]
    assert picked["pick"]["sweep"] == {
        "grid": {"model.init_args.lr": [float(d[3:]) for d in order]},
        "extended": int(expect_extra is not None),
    }
    before = {d: (out / d / "merge_manifest.json").stat().st_mtime_ns for d in made}
    caplog.clear()
    main(
        [
            "sweep",
            "--config",
            str(p),
            "--grid",
            "model.init_args.lr=0.01,0.1",
            "--out",
            str(out),
            "--into",
            str(tmp_path / "again"),
            "--",
            "--trainer.max_steps=4",
        ]
    )
    assert {d: (out / d / "merge_manifest.json").stat().st_mtime_ns for d in made} == before  # nothing retrained
    assert caplog.text.count("not trained again") == 2
    # the same --out with other fit arguments: its candidates are another sweep's, refused
    caplog.clear()
    with pytest.raises(SystemExit):
        main(
            [
                "sweep",
                "--config",
                str(p),
                "--grid",
                "model.init_args.lr=0.01,0.1",
                "--out",
                str(out),
                "--into",
                str(tmp_path / "other"),
                "--",
                "--trainer.max_steps=2",
            ]
        )
    assert "holds the candidates of another sweep" in caplog.text and not (tmp_path / "other").exists()
    # refused before training: no SelectStep, no held-back rows, a bad grid, --extend over two settings
    bare = dict(cfg, trainer={**cfg["trainer"], "callbacks": []})
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump(bare))
    unheld = dict(cfg, data={**cfg["data"], "holdout": 0})
    (tmp_path / "unheld.yaml").write_text(yaml.safe_dump(unheld))
    for config, grid, extra, message in (
        ("bare.yaml", ["model.init_args.lr=0.01,0.1"], [], "without the SelectStep callback"),
        ("unheld.yaml", ["model.init_args.lr=0.01,0.1"], [], "holds no rows back"),
        ("fit.yaml", ["model.init_args.lr"], [], "expected KEY=V1,V2"),
        ("fit.yaml", ["model.init_args.lr=0.01"], [], "one candidate"),
        ("fit.yaml", ["model.init_args.lr=0.01,0.01"], [], "a value is repeated"),
        ("missing.yaml", ["model.init_args.lr=0.01,0.1"], [], "is not a file"),
        ("fit.yaml", ["model.init_args.lr=0.01,0.1", "optimizer.lr=0.1,1"], [], "end in the same name"),
        (
            "fit.yaml",
            ["model.init_args.lr=0.01,0.1", "model.init_args.init=0.3,0.5"],
            ["--extend", "1"],
            "follows one setting",
        ),
    ):
        caplog.clear()
        args = ["sweep", "--config", str(tmp_path / config), "--out", str(tmp_path / "refused"), *extra]
        for g in grid:
            args += ["--grid", g]
        with pytest.raises(SystemExit):
            main(args)
        assert message in caplog.text, config
        assert not (tmp_path / "refused").exists()


def test_sweep_follows_a_kept_edge_until_the_score_turns(tmp_path, monkeypatch):
    """The extension loop, each candidate's training replaced by an export whose score peaks at lr 1 on a log scale
    (the real training path is the test above, whose tiny zoo scores every rate alike): 0.01, 0.1 keeps 0.1 (the
    largest) → 1.0 is trained, kept, still the largest → 10 is trained, scores lower, and the loop stops with 1.0 kept
    (3 extensions allowed, 2 used); with `extend=1` it stops after 1.0, still at the edge."""
    import math

    import adamerge.cli.sweep as sweep_module

    trained = []

    def fake_train(config, extra, values, out):
        lr = values["model.init_args.lr"]
        trained.append(lr)
        out.mkdir(parents=True)
        (out / "merge_manifest.json").write_text(
            json.dumps(
                {
                    "method": "adamerging",
                    "base": {"sha256": "b"},
                    "sources": [{"task": "t", "sha256": "s"}],
                    "selection": {"criterion": "agreement", "selected_step": 10, "score": -abs(math.log10(lr))},
                    "data": {"tasks": ["t"], "seed": 0, "holdout": 8, "max_length": 16},
                    "hparams": {"lr": lr},
                }
            )
        )
        return out

    monkeypatch.setattr(sweep_module, "train", fake_train)
    monkeypatch.setattr(sweep_module, "check_config", lambda *a: None)
    config = tmp_path / "fit.yaml"
    config.write_text("model: {}\n")
    record = sweep_module.sweep(config, {"model.init_args.lr": [0.01, 0.1]}, tmp_path / "a", extend=3)
    assert trained == [0.01, 0.1, 1.0, 10.0]
    assert record["chosen"] == str(tmp_path / "a" / "lr=1.0") and record["at_edge"] == {}
    assert record["sweep"] == {"grid": {"model.init_args.lr": [0.01, 0.1, 1.0, 10.0]}, "extended": 2}
    assert json.loads((tmp_path / "a" / "best" / "merge_manifest.json").read_text())["pick"] == record
    trained.clear()
    record = sweep_module.sweep(config, {"model.init_args.lr": [0.01, 0.1]}, tmp_path / "b", extend=1)
    assert trained == [0.01, 0.1, 1.0] and record["at_edge"] == {"lr": "largest"}
    trained.clear()  # from below: 100, 10 keeps 10 (the smallest) → 1.0
    record = sweep_module.sweep(config, {"model.init_args.lr": [100.0, 10.0]}, tmp_path / "c", extend=4)
    assert trained == [100.0, 10.0, 1.0, 0.1] and record["chosen"] == str(tmp_path / "c" / "lr=1.0")


def test_sweep_extends_on_the_grids_own_spacing():
    from adamerge.cli.sweep import next_value, parse_grid

    assert next_value([1e-3, 1e-2], "largest") == 0.1 and next_value([1e-3, 1e-2], "smallest") == 1e-4
    assert next_value([3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "largest") == 0.09  # ratio of the two outermost values
    assert next_value([0.0, 0.5], "largest") == 1.0 and next_value([0.0, 0.5], "smallest") == -0.5  # not all > 0
    assert next_value([100, 200], "largest") == 400 and next_value([1, 2], "smallest") == 0  # integers stay integers
    assert isinstance(next_value([100, 200], "largest"), int)
    assert parse_grid(["model.init_args.lr=1e-3,1e-2", "--model.init_args.objective=kl,pseudo_label"]) == {
        "model.init_args.lr": [1e-3, 1e-2],
        "model.init_args.objective": ["kl", "pseudo_label"],
    }


def test_pick_flags_a_chosen_value_at_the_edge_of_the_candidates():
    """Only numeric hyperparameters the candidates vary count; the chosen value is flagged when it is the largest
    or the smallest tried, not when candidates lie on both sides of it nor when another candidate ties its score."""
    from adamerge.pick import at_edge

    grid = [
        {"lr": 3e-4, "init": 0.3, "objective": "kl", "clamp": True, "betas": [0.9, 0.999]},
        {"lr": 1e-3, "init": 0.3, "objective": "pseudo_label", "clamp": False, "betas": [0.9, 0.99]},
        {"lr": 1e-2, "init": 0.3, "objective": "kl", "clamp": True, "betas": [0.9, 0.999]},
    ]
    assert at_edge(grid, 0) == {"lr": "smallest"}
    assert at_edge(grid, 1) == {}  # inside the grid; strings, booleans, lists and a fixed init do not count
    assert at_edge(grid, 2) == {"lr": "largest"}
    two = [{"lr": 1e-3, "init": 0.3}, {"lr": 1e-3, "init": 1.0}, {"lr": 1e-2, "init": 0.6}]
    assert at_edge(two, 2) == {"lr": "largest"}  # init 0.6 lies between
    assert at_edge(two, 0) == {"lr": "smallest", "init": "smallest"}
    assert at_edge([{"lr": 1e-3}, {"lr": None}], 0) == {}  # not every candidate gives a number
    assert at_edge([{"lr": 1e-3}, {}], 0) == {}
    # a tie at the top shows no trend: nothing flagged; a lower score elsewhere does not matter
    assert at_edge(grid, 2, [0.5, 0.7, 0.7]) == {} and at_edge(grid, 2, [0.7, 0.5, 0.8]) == {"lr": "largest"}


def test_fit_with_recompute_ends_where_the_plain_fit_does(zoo, task_data, tmp_path):
    """`recompute` through the command (6 steps, one task at a time on CPU): the same trained coefficients as the
    plain step to 1e-6, recorded in the manifest."""
    ends = {}
    for recompute in (None, "activations", "merge"):
        root = tmp_path / str(recompute)
        cfg = fit_config(zoo, task_data, root, recompute=recompute)  # Adam at 1e-3: moves of ~6e-3
        cfg["trainer"]["logger"] = False
        p = tmp_path / f"{recompute}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        lightning_main(["fit", "--config", str(p)])
        manifest = json.loads((root / "merged" / "merge_manifest.json").read_text())
        assert manifest["hparams"]["recompute"] == recompute and manifest["hparams"]["task_chunks"] == 3
        ends[recompute] = torch.tensor(manifest["coefficients"]["values"])
    assert (ends[None] - 0.3).abs().max() > 1e-3
    for recompute in ("activations", "merge"):
        torch.testing.assert_close(ends[recompute], ends[None], atol=1e-6, rtol=0)


def test_backbone_mode_train_switches_dropout_on_only_while_training(zoo, task_data, tmp_path):
    """`--backbone_mode train`: the backbone trains with dropout on (its modules in train mode at every step) and is
    back in eval mode for the export; the default keeps it in eval mode throughout."""
    import pytorch_lightning as pl

    from adamerge.io.datasets import TaskData
    from adamerge.methods import AdaMerging
    from adamerge.training.callbacks import BackboneMode
    from adamerge.training.datamodule import UnlabeledDataModule

    class Probe(pl.Callback):
        def __init__(self):
            self.modes = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.modes.append(pl_module.merged.backbone.training)

    base, paths = zoo
    for mode, expected in (("train", True), ("eval", False)):
        module = AdaMerging(base, paths)
        dm = UnlabeledDataModule(
            {t: TaskData(p) for t, p in task_data.items()}, tokenizer=base, samples_per_task=4, max_length=16
        )
        probe = Probe()
        pl.Trainer(
            max_steps=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            callbacks=[BackboneMode(mode), probe],
        ).fit(module, datamodule=dm)
        assert probe.modes == [expected, expected]
        assert not any(m.training for m in module.merged.backbone.modules())
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "backbone_mode": "train",
                "model": {"class_path": "adamerge.methods.AdaMerging", "init_args": {"base": base, "models": paths}},
                "data": {"tasks": {t: {"path": p} for t, p in task_data.items()}},
            }
        )
    )
    assert parse_only(cfg).backbone_mode == "train"
    cfg.write_text(cfg.read_text() + "batchnorm_statistics: mixed\n")
    with pytest.raises(SystemExit):  # not one of batch, running
        parse_only(cfg)


def test_the_optimizer_is_configured_the_lightning_way(zoo, task_data, tmp_path):
    """``optimizer: {class_path, init_args}`` picks the optimizer class and its own arguments; the method's ``lr``
    is its learning rate. Reference: one SGD-with-momentum step on the logged gradient, by hand."""
    cfg = fit_config(
        zoo,
        task_data,
        tmp_path,
        lr=0.05,
        objective="entropy",
        optimizer={"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9}},
    )
    cfg["trainer"].update(max_steps=1, logger=False)
    p = tmp_path / "fit.yaml"
    p.write_text(yaml.safe_dump(cfg))
    cli = lightning_main(["--config", str(p)], run=False)
    module = cli.model
    opt = module.configure_optimizers()
    assert type(opt) is torch.optim.SGD and opt.defaults["lr"] == 0.05 and opt.defaults["momentum"] == 0.9
    before = module.merged.coefficients.weight.detach().clone()
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    loss, _ = module.objective(batch)
    loss.backward()
    grad = module.merged.coefficients.weight.grad.detach().clone()
    opt.step()
    torch.testing.assert_close(module.merged.coefficients.weight.detach(), before - 0.05 * grad)
