"""Exports that fit the Hugging Face ecosystem: sharded and typed weights, the model card, the union vocabulary and
the upload to the Hub (issue 16)."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from adamerge.errors import MergeInputError
from adamerge.methods import AdaMerging, TaskArithmetic


def stock_logits(path, texts=("good movie great plot", "free prize call now")):
    """Logits of every exported model at ``path`` loaded with stock transformers only."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    enc = tok(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        out = {"encoder": AutoModel.from_pretrained(str(path)).eval()(**enc).last_hidden_state}
        for task_dir in sorted((path / "tasks").iterdir()):
            model = AutoModelForSequenceClassification.from_pretrained(str(task_dir)).eval()
            out[task_dir.name] = model(**enc).logits
    return out


def tensors_of(path) -> dict[str, torch.Tensor]:
    """Every weight tensor of an export, read file by file with safetensors (not adamerge's reader)."""
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def ta(zoo):
    return TaskArithmetic(*zoo, scale=0.3)


def test_sharded_export_loads_in_stock_transformers_with_the_same_logits(ta, tmp_path):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    ta.export(whole)
    ta.export(sharded, max_shard_size="20KB")
    assert (whole / "model.safetensors").is_file() and not (whole / "model.safetensors.index.json").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    n = len(files)
    assert n > 2 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    ref = load_file(str(whole / "model.safetensors"))
    assert set(index["weight_map"]) == set(ref)
    for f in files:  # every shard within the limit unless it is one tensor larger than it
        with safe_open(str(sharded / f), framework="pt") as h:
            keys = list(h.keys())
            size = sum(h.get_tensor(k).numel() * 4 for k in keys)
        assert size <= 20_000 or len(keys) == 1, (f, size, keys)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())
    task_index = json.loads((sharded / "tasks" / "spam" / "model.safetensors.index.json").read_text())
    assert any(k.startswith("classifier.") for k in task_index["weight_map"])
    got, expected = stock_logits(sharded), stock_logits(whole)
    assert set(got) == {"encoder", "sentiment", "topic", "spam"}
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # and the unsharded export is the wrapper's merge (independent: the module's own forward)
    wrapper = {n: p for n, p in ta.final_merged_params().items()}
    assert all(torch.equal(ref[n], wrapper[n]) for n in wrapper)


def test_bfloat16_export_stores_bfloat16_and_says_so(ta, tmp_path):
    out = tmp_path / "bf16"
    ta.export(out, dtype="bfloat16")
    fp32 = ta.final_merged_params()
    stored = tensors_of(out)
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.bfloat16}
    for n, t in fp32.items():
        assert torch.equal(stored[n], t.to(torch.bfloat16)), n
    task = tensors_of(out / "tasks" / "spam")
    assert task["classifier.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "merge_manifest.json").read_text())["weights"]["dtype"] == "bfloat16"
    assert load_file(str(out / "heads.safetensors"))["spam/classifier.weight"].dtype == torch.bfloat16
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(out / "tasks" / "spam"), dtype="auto")
    assert model.classifier.weight.dtype == torch.bfloat16


def test_export_options_are_checked_before_writing(ta, tmp_path):
    for bad, word in (
        ({"dtype": "float8"}, "dtype"),
        ({"max_shard_size": "lots"}, "max_shard_size"),
        ({"max_shard_size": "0KB"}, "max_shard_size"),
    ):
        with pytest.raises(MergeInputError, match=word):
            ta.export(tmp_path / "x", **bad)
        assert not (tmp_path / "x").exists()


def test_streaming_writer_matches_safetensors_reader(tmp_path):
    from adamerge.io.safetensors import parse_size, write_safetensors

    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6).view(2, 3),
        "d": torch.tensor(2.5),
        "e": torch.zeros(0, 4),
        "f": torch.tensor([True, False, True]),
        "g": torch.randn(2, 2).half(),
    }
    entries = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    seen = []
    write_safetensors(tmp_path / "x.safetensors", entries, lambda k: seen.append(k) or tensors[k])
    assert seen == list(tensors)  # one tensor asked for at a time, in order
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    raw = (tmp_path / "x.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert header_len % 8 == 0 and json.loads(raw[8 : 8 + header_len])["__metadata__"] == {"format": "pt"}
    assert (parse_size("5GB"), parse_size("100KB"), parse_size("2MiB"), parse_size(1234)) == (
        5 * 10**9,
        100_000,
        2 * 2**20,
        1234,
    )


def test_lazy_merge_merges_each_block_once_and_equals_the_full_merge(zoo, monkeypatch):
    module = AdaMerging(*zoo, granularity="layer")
    with torch.no_grad():
        module.merged.coefficients.weight.uniform_(0, 1)
    full = module.final_merged_params()
    calls = []
    for i, st in enumerate(module.merged.stores):
        real = st.forward
        monkeypatch.setattr(st, "forward", lambda *a, real=real, i=i: calls.append(i) or real(*a))
    lazy = module.export_params()
    got = {n: lazy[n] for n in module.merged.param_names}
    assert calls == list(range(len(module.merged.stores)))  # model order: each block merged once
    assert all(torch.equal(got[n], full[n]) for n in full)
    assert lazy._block is not None and len(lazy._block[1]) < len(full)  # one block held, not the model


def test_model_card_front_matter_sources_and_coefficients(zoo, tmp_path):
    module = AdaMerging(*zoo, granularity="layer")
    with torch.no_grad():
        module.merged.coefficients.weight.copy_(
            torch.linspace(0.1, 0.9, module.merged.coefficients.weight.numel()).view_as(
                module.merged.coefficients.weight
            )
        )
    out = module.export(tmp_path / "m", per_task_models=False)
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == zoo[0]
    assert {"merge", "adamerge"} <= set(meta["tags"])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "feature-extraction"
    manifest = json.loads((out / "merge_manifest.json").read_text())
    for s in manifest["sources"]:
        assert s["source"] in text and s["sha256"][:16] in text
    # the compact table: one column per block, each the mean of that block's coefficients (recomputed here)
    eff = torch.tensor(manifest["coefficients"]["effective"])
    params = manifest["coefficients"]["params"]
    layer0 = [j for j, p in enumerate(params) if p.startswith("encoder.layer.0.")]
    row = next(line for line in text.splitlines() if line.startswith("| spam |"))
    header = next(line for line in text.splitlines() if line.startswith("| task |"))
    col = [c.strip() for c in header.split("|")].index("encoder.layer.0")
    t = manifest["coefficients"]["tasks"].index("spam")
    assert float(row.split("|")[col]) == pytest.approx(float(eff[t, layer0].mean()), abs=5e-4)
    assert (out / "coefficients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Exported from Python" in text  # no run config given


def test_no_model_card_when_switched_off(ta, tmp_path):
    out = ta.export(tmp_path / "m", per_task_models=False, model_card=False)
    assert not (out / "README.md").exists()


def test_evaluate_write_puts_the_results_into_the_card(ta, task_data, tmp_path):
    from adamerge.evaluate import evaluate_checkpoint

    out = ta.export(tmp_path / "m", per_task_models=False)
    assert "## Evaluation" not in (out / "README.md").read_text()
    scores = evaluate_checkpoint(str(out), {"spam": {"path": task_data["spam"]}}, write=True)
    text = (out / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| spam |") and line.count("|") == 4)
    assert float(row.split("|")[2]) == pytest.approx(scores["spam"]["accuracy"], abs=5e-4)
    assert json.loads((out / "eval_results.json").read_text())["scores"]["spam"] == scores["spam"]


def test_merge_command_writes_card_with_its_config_and_shards(zoo, tmp_path):
    from adamerge.cli.main import main

    base, paths = zoo
    cfg = {
        "model": {
            "class_path": "adamerge.methods.TaskArithmetic",
            "init_args": {"base": base, "models": paths, "scale": 0.4},
        },
        "output_dir": str(tmp_path / "out"),
        "max_shard_size": "30KB",
        "dtype": "float16",
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    main(["merge", "--config", str(tmp_path / "merge.yaml")])
    out = tmp_path / "out"
    text = (out / "README.md").read_text()
    config = yaml.safe_load(text.split("```yaml\n")[1].split("```")[0])
    assert config["model"]["init_args"]["scale"] == 0.4 and config["dtype"] == "float16"
    assert "adamerge merge --config" in text
    assert (out / "model.safetensors.index.json").is_file()
    assert {t.dtype for t in tensors_of(out).values() if t.is_floating_point()} == {torch.float16}


# -- union vocabulary --------------------------------------------------------------------------------------------
def _extended(root, base_dir, task, new_tokens, special=(), seed=0, num_labels=2):
    """A 'fine-tune' of the tiny base whose tokenizer got ``new_tokens`` (and special ``special``) added and whose
    embeddings were resized (new rows random), as a user would do before fine-tuning."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    tok.add_tokens(list(new_tokens))
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    model = BertForSequenceClassification.from_pretrained(str(base_dir), num_labels=num_labels)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(root / task))
    tok.save_pretrained(str(root / task))
    return str(root / task)


def test_union_vocabulary_merges_shared_rows_and_averages_added_ones(zoo, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    base, paths = zoo
    from pathlib import Path

    a = _extended(tmp_path, Path(base), "a", ["newword", "alpha"], special=["<tool>"], seed=1)
    b = _extended(tmp_path, Path(base), "b", ["newword", "beta"], seed=2)
    models = {"a": a, "b": b, "spam": paths["spam"]}
    out = TaskArithmetic(base, models, scale=0.3).export(tmp_path / "out")
    base_tok = AutoTokenizer.from_pretrained(base)
    V = len(base_tok)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == V + 4
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("newword", "alpha", "<tool>", "beta")}
    assert sorted(ids.values()) == list(range(V, V + 4))
    assert "<tool>" in tok.all_special_tokens
    assert json.loads((out / "config.json").read_text())["vocab_size"] == V + 4
    # reference: the rows read straight from the three checkpoints, merged by hand
    emb = "embeddings.word_embeddings.weight"
    rows = {}
    for name, src in {"base": base, **models}.items():
        rows[name] = AutoModel.from_pretrained(src).state_dict()[emb]
    tok_a, tok_b = AutoTokenizer.from_pretrained(a), AutoTokenizer.from_pretrained(b)
    merged = load_file(str(out / "model.safetensors"))[emb]
    assert merged.shape[0] == V + 4
    shared = rows["base"] + 0.3 * sum(rows[t][:V] - rows["base"] for t in models)
    assert torch.allclose(merged[:V], shared, atol=1e-6)
    nw_a, nw_b = rows["a"][tok_a.convert_tokens_to_ids("newword")], rows["b"][tok_b.convert_tokens_to_ids("newword")]
    assert torch.allclose(merged[ids["newword"]], (nw_a + nw_b) / 2, atol=1e-6)
    assert torch.equal(merged[ids["alpha"]], rows["a"][tok_a.convert_tokens_to_ids("alpha")])
    assert torch.equal(merged[ids["<tool>"]], rows["a"][tok_a.convert_tokens_to_ids("<tool>")])
    assert torch.equal(merged[ids["beta"]], rows["b"][tok_b.convert_tokens_to_ids("beta")])
    # every exported model loads in stock transformers and reads the added tokens
    enc = tok(["newword beta <tool> good"], return_tensors="pt")
    assert enc["input_ids"].max() >= V
    from transformers import AutoModelForSequenceClassification

    for task in models:
        model = AutoModelForSequenceClassification.from_pretrained(str(out / "tasks" / task)).eval()
        assert model.config.vocab_size == V + 4
        with torch.no_grad():
            assert torch.isfinite(model(**enc).logits).all()


def _other_tokenizer(tmp_path, base, paths):
    """A copy of the 'spam' fine-tune saved with another tokenizer of the same size (ids 7 and 8 swapped)."""
    from transformers import AutoTokenizer, BertForSequenceClassification, BertTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    words = tok.convert_ids_to_tokens(list(range(len(tok))))
    swapped = list(words)
    swapped[7], swapped[8] = swapped[8], swapped[7]
    other = tmp_path / "other"
    BertTokenizer(vocab={w: i for i, w in enumerate(swapped)}).save_pretrained(str(other))
    BertForSequenceClassification.from_pretrained(paths["spam"]).save_pretrained(str(other))
    return str(other), words


def test_different_tokenizers_are_refused_naming_both_models_and_the_token(zoo, tmp_path):
    base, paths = zoo
    other, words = _other_tokenizer(tmp_path, base, paths)
    with pytest.raises(MergeInputError) as e:
        TaskArithmetic(base, {"spam": paths["spam"], "other": other})
    msg = str(e.value)
    assert base in msg and other in msg and "'other'" in msg
    assert "token id 7" in msg and repr(words[7]) in msg and repr(words[8]) in msg


def test_merge_command_says_so_in_one_line(zoo, tmp_path, caplog):
    """`adamerge merge` with an incompatible vocabulary: one error line (no config namespace), exit 2, no output."""
    import logging

    from adamerge.cli.main import main

    base, paths = zoo
    other, _ = _other_tokenizer(tmp_path, base, paths)
    cfg = {
        "model": {
            "class_path": "adamerge.methods.TaskArithmetic",
            "init_args": {"base": base, "models": {"spam": paths["spam"], "other": other}},
        },
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    caplog.set_level(logging.ERROR)
    with pytest.raises(SystemExit) as e:
        main(["merge", "--config", str(tmp_path / "merge.yaml")])
    assert e.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("vocabularies differ") and "Namespace(" not in errors[0]
    assert not (tmp_path / "out").exists()


def test_bigger_vocabulary_without_a_tokenizer_is_refused(zoo, tmp_path):
    from transformers import BertForSequenceClassification

    base, paths = zoo
    model = BertForSequenceClassification.from_pretrained(paths["spam"])
    model.resize_token_embeddings(model.config.vocab_size + 2)
    model.save_pretrained(str(tmp_path / "bare"))  # no tokenizer saved
    with pytest.raises(MergeInputError, match=r"vocab size \d+ vs base \d+; a fine-tune that added tokens"):
        TaskArithmetic(base, {"bare": str(tmp_path / "bare")})


# -- push to the Hub ---------------------------------------------------------------------------------------------
class RecordingApi:
    """Stands in for ``huggingface_hub.HfApi``: records the calls (and what the folder held at upload time)."""

    calls: list = []
    fail: bool = False

    def __init__(self, *a, **kw) -> None:
        pass

    def create_repo(self, repo_id, **kw):
        RecordingApi.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        RecordingApi.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        from pathlib import Path

        files = sorted(str(p.relative_to(kw["folder_path"])) for p in Path(kw["folder_path"]).rglob("*") if p.is_file())
        RecordingApi.calls.append(("upload_folder", kw["repo_id"], {**kw, "files": files}))
        if RecordingApi.fail:
            raise ConnectionError("no route to host")
        return type("Info", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/1"})()


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    RecordingApi.calls, RecordingApi.fail = [], False
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi


def test_push_to_hub_uploads_the_finished_folder_once(ta, tmp_path, hub):
    out = ta.export(tmp_path / "m", per_task_models=False, push_to_hub="me/merged", hub_private=True, hub_revision="v1")
    kinds = [c[0] for c in hub.calls]
    assert kinds == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][1] == "me/merged" and hub.calls[0][2]["private"] is True
    up = hub.calls[2][2]
    assert up["repo_id"] == "me/merged" and up["revision"] == "v1"
    assert str(up["folder_path"]) == str(out.resolve()) or str(up["folder_path"]) == str(out)
    assert {"merge_manifest.json", "README.md", "model.safetensors", "config.json"} <= set(up["files"])
    assert 'from_pretrained("me/merged"' in (out / "README.md").read_text()  # the card names its repo


def test_failed_upload_keeps_the_export_and_says_how_to_retry(ta, tmp_path, hub):
    from adamerge.io.hub import UploadError

    hub.fail = True
    with pytest.raises(UploadError) as e:
        ta.export(tmp_path / "m", per_task_models=False, push_to_hub="me/merged")
    assert "hf upload me/merged" in str(e.value) and "ConnectionError" in str(e.value)
    assert (tmp_path / "m" / "merge_manifest.json").is_file() and (tmp_path / "m" / "model.safetensors").is_file()


def test_merge_command_push_failure_is_one_line_exit_2(zoo, tmp_path, hub, capsys):
    from adamerge.cli.main import main

    hub.fail = True
    base, paths = zoo
    cfg = {
        "model": {"class_path": "adamerge.methods.TaskArithmetic", "init_args": {"base": base, "models": paths}},
        "output_dir": str(tmp_path / "out"),
        "per_task_models": False,
        "push_to_hub": "me/merged",
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        main(["merge", "--config", str(tmp_path / "merge.yaml")])
    assert e.value.code == 2
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_load_merged_refuses_a_root_tensor_its_backbone_has_no_place_for(ta, tmp_path):
    """A root tensor the backbone class cannot hold is an error naming it (transformers would drop it with a warning
    and serve a model without it); a root that holds what the class can is loaded as before."""
    from safetensors.torch import save_file

    from adamerge import load_merged

    out = ta.export(tmp_path / "merged")
    before = load_merged(out).predict("sentiment", input_ids=torch.tensor([[2, 5, 6, 3]]))
    weights = load_file(str(out / "model.safetensors"))
    save_file(
        {**weights, "encoder.stray.weight": torch.zeros(2)}, str(out / "model.safetensors"), metadata={"format": "pt"}
    )
    with pytest.raises(MergeInputError, match=r"encoder\.stray\.weight"):
        load_merged(out)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    torch.testing.assert_close(load_merged(out).predict("sentiment", input_ids=torch.tensor([[2, 5, 6, 3]])), before)


def _own_bytes(directory, pattern: str = "*") -> int:
    """Bytes the files of a directory that match ``pattern`` hold themselves: symbolic links are not followed, a hard
    link is counted once."""
    seen, total = set(), 0
    for f in sorted(directory.rglob(pattern)):
        st = f.lstat()
        if f.is_file() and not f.is_symlink() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


@pytest.mark.parametrize("link", ["symlink", "hardlink", "copy"])
def test_per_task_models_share_the_roots_weights(ta, tmp_path, monkeypatch, caplog, link):
    """tasks/<task>/ stores only its head (and config, tokenizer); its backbone tensors are the root's files, linked
    (symbolic, else hard, else copied with a note). Stock transformers loads each with the logits of a self-contained
    checkpoint: the root's backbone under the task's head, computed here by hand."""
    from pathlib import Path

    from transformers import AutoModel, AutoTokenizer

    if link != "symlink":
        monkeypatch.setattr(Path, "symlink_to", lambda *a, **k: (_ for _ in ()).throw(OSError("no symlinks")))
    if link == "copy":
        monkeypatch.setattr("os.link", lambda *a, **k: (_ for _ in ()).throw(OSError("no hard links")))
    out = ta.export(tmp_path / "m")
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["task_weights"] == link
    task = out / "tasks" / "spam"
    shared = task / "model-root-00001.safetensors"
    assert shared.is_symlink() == (link == "symlink")
    if link == "symlink":
        assert os.readlink(shared) == os.path.join("..", "..", "model.safetensors")
    if link == "hardlink":
        assert shared.stat().st_ino == (out / "model.safetensors").stat().st_ino
    index = json.loads((task / "model.safetensors.index.json").read_text())
    assert {f for f in index["weight_map"].values()} == {"model-root-00001.safetensors", "model-task.safetensors"}
    assert set(load_file(str(task / "model-task.safetensors"))) == {"classifier.weight", "classifier.bias"}
    weights = _own_bytes(out, "*.safetensors")
    heads_only = sum((out / "tasks" / t / "model-task.safetensors").stat().st_size for t in ta.task_names)
    root = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    if link != "copy":  # a full copy of the backbone per task before; now only each head
        assert weights == root + heads_only
    else:
        assert weights == root + heads_only + len(ta.task_names) * (out / "model.safetensors").stat().st_size
        assert "the root's weights are copied" in caplog.text
    tok = AutoTokenizer.from_pretrained(str(out))
    enc = tok(["good movie great plot", "free prize call now"], padding=True, return_tensors="pt")
    heads = load_file(str(out / "heads.safetensors"))
    with torch.no_grad():
        pooled = AutoModel.from_pretrained(str(out)).eval()(**enc).pooler_output
        want = pooled @ heads["spam/classifier.weight"].T + heads["spam/classifier.bias"]
    torch.testing.assert_close(stock_logits(out)["spam"], want, atol=1e-5, rtol=1e-5)
