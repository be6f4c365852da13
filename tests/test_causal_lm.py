"""Causal LMs: zero/one-hot identities on logits, the KL-to-experts objective decreases, export loads in stock
transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import WORDS, make_tokenizer, quick_fit, save_lm_zoo, tiny_llama

from adamerge.io.datasets import TaskData
from adamerge.methods import AdaMerging, TaskArithmetic
from adamerge.training.datamodule import UnlabeledDataModule

VOCAB = len(WORDS) + 5


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    )


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm_zoo(request, tmp_path_factory):
    return save_lm_zoo(
        tmp_path_factory.mktemp(request.param), {"llama": tiny_llama, "gpt2": gpt2}[request.param], ("chat", "code")
    )


@pytest.fixture(scope="module")
def lm_data(lm_zoo, task_data):
    tasks = {"chat": TaskData(task_data["sentiment"]), "code": TaskData(task_data["spam"])}
    dm = UnlabeledDataModule(tasks, tokenizer=lm_zoo[0], samples_per_task=4, max_length=16)
    dm.setup()
    return dm, tasks


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_zero_and_one_hot_coefficients_on_logits(lm_zoo, lm_data, granularity):
    from transformers import AutoModelForCausalLM

    base, paths = lm_zoo
    module = AdaMerging(base, paths, granularity=granularity, init=0.0, task_type="causal_lm")
    b = lm_data[0].dataset[0]
    inputs = b["inputs"]
    with torch.no_grad():
        zero = module.merged(inputs, b["tasks"], b["sizes"])
    for i, (task, src) in enumerate([("base", base), *paths.items()]):
        ref = AutoModelForCausalLM.from_pretrained(src).eval()
        with torch.no_grad():
            expected = ref(**inputs).logits
        if task == "base":
            got = torch.cat([zero[t] for t in b["tasks"]])
        else:
            w = torch.zeros_like(module.merged.coefficients.weight)
            w[i - 1] = 1.0
            module.merged.coefficients.weight.data.copy_(w)
            with torch.no_grad():
                out = module.merged(inputs, b["tasks"], b["sizes"])
            got = torch.cat([out[t] for t in b["tasks"]])
        assert (got - expected).abs().max() < 1e-5, task


def test_kl_objective_decreases(lm_zoo, lm_data):
    base, paths = lm_zoo
    dm, _ = lm_data
    module = AdaMerging(
        base, paths, granularity="layer", task_type="causal_lm", objective="kl", lr=0.05, init=0.0
    )  # from the base: far from the optimum (the experts conflict near it)
    batch = dm.dataset[0]
    with torch.no_grad():
        before = float(module.objective(batch)[0])
    quick_fit(module, dm, 15)
    with torch.no_grad():
        after = float(module.objective(batch)[0])
    assert after < 0.9 * before, (before, after)


def test_entropy_objective_counts_only_non_pad_tokens(lm_zoo, lm_data):
    base, paths = lm_zoo
    module = AdaMerging(base, paths, task_type="causal_lm")
    batch = lm_data[0].dataset[0]
    masks = module.row_masks(batch)
    assert masks is not None and not masks["chat"].all()  # the batch has padding
    with torch.no_grad():
        loss, per_task = module.objective(batch)
        logits = module.merged(batch["inputs"], batch["tasks"], batch["sizes"])
    assert set(per_task) == {"chat", "code"}
    for task, z in logits.items():  # reference: a loop over the non-pad positions only, in float64
        values = []
        for i, j in masks[task].nonzero().tolist():
            p = torch.softmax(z[i, j].double(), -1)
            values.append(float(-(p * p.log()).sum()))
        assert abs(float(per_task[task]) - sum(values) / len(values)) < 1e-4


def test_export_loads_in_stock_transformers(lm_zoo, lm_data, tmp_path):
    base, paths = lm_zoo
    module = TaskArithmetic(base, paths, scale=0.4, task_type="causal_lm")
    b = lm_data[0].dataset[0]
    with torch.no_grad():
        expected = torch.cat([v for v in module.merged(b["inputs"], b["tasks"], b["sizes"]).values()])
    module.export(tmp_path / "out")
    torch.save({"inputs": b["inputs"], "expected": expected}, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        d = torch.load({str(tmp_path / "x.pt")!r})
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "out")!r}).eval()
        with torch.no_grad():
            got = m(**d["inputs"]).logits
        assert "adamerge" not in sys.modules
        print((got - d["expected"]).abs().max().item())
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-5
    # adamerge.load_merged serves the same model for every source task (there are no per-task heads)
    from adamerge import load_merged
    from adamerge.errors import MergeInputError

    served = load_merged(tmp_path / "out")
    assert served.tasks == list(paths)
    for task in paths:
        torch.testing.assert_close(served.predict(task, **b["inputs"]), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(MergeInputError, match="task 'other' not in this checkpoint"):
        served.predict("other", **b["inputs"])


def test_vocab_mismatch_is_a_clear_error(lm_zoo, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from adamerge.errors import MergeInputError

    base, paths = lm_zoo
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB + 7,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    other.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(MergeInputError, match=r"model 'other'"):
        TaskArithmetic(base, {"chat": paths["chat"], "other": str(tmp_path / "other")}, task_type="causal_lm")


@pytest.mark.parametrize("tied", [True, False])
def test_union_vocabulary_of_a_causal_lm_reproduces_the_fine_tune(tmp_path, tied):
    """One fine-tune that added tokens, merged alone at scale 1, is that fine-tune: every logit of the export — on
    inputs that use the added tokens — equals its own (input and output embeddings remapped, tied or not)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    def model():
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=tied,
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=3,
            )
        )

    torch.manual_seed(0)
    make_tokenizer(tmp_path / "base")
    model().save_pretrained(str(tmp_path / "base"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "base"))
    tok.add_tokens(["<think>", "</think>"])
    ft = LlamaForCausalLM.from_pretrained(str(tmp_path / "base"))
    ft.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ft.save_pretrained(str(tmp_path / "ft"))
    tok.save_pretrained(str(tmp_path / "ft"))
    out = TaskArithmetic(
        str(tmp_path / "base"), {"think": str(tmp_path / "ft")}, scale=1.0, task_type="causal_lm"
    ).export(tmp_path / "out")
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    union = AutoTokenizer.from_pretrained(str(out))
    assert len(union) == VOCAB + 2 and merged.config.vocab_size == VOCAB + 2
    ids = union(["<think> good movie </think> hello"], return_tensors="pt")["input_ids"]
    assert ids.max() == VOCAB + 1
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ft")).eval()
    with torch.no_grad():
        assert (merged(ids).logits - reference(ids).logits).abs().max() < 1e-5


def test_evaluate_scores_each_tasks_text_by_next_token_likelihood(lm_zoo, task_data, tmp_path):
    """`adamerge evaluate` on a causal LM export, and on a plain fine-tune directory: each task's mean next-token NLL
    (padding excluded) and its perplexity, against stock transformers' own loss on one unpadded row at a time; no
    label is read; --write puts the table in the card; borrowing heads is refused."""
    import csv
    import json
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adamerge.cli.main import main
    from adamerge.errors import MergeInputError
    from adamerge.evaluate import evaluate_checkpoint

    base, paths = lm_zoo
    out = tmp_path / "out"
    TaskArithmetic(base, paths, scale=0.4, task_type="causal_lm").export(out)
    files = {}
    for task, source in (("chat", "sentiment"), ("code", "spam")):
        files[task] = tmp_path / f"{task}.csv"
        with open(task_data[source]) as f, files[task].open("w", newline="") as g:
            w = csv.writer(g)
            w.writerow(["text"])  # no label column at all
            w.writerows([r["text"]] for r in csv.DictReader(f))
    tasks = {t: {"path": str(p)} for t, p in files.items()}

    def reference(model_dir, task):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        tok = AutoTokenizer.from_pretrained(str(out))
        total, count = 0.0, 0
        for text in (r["text"] for r in csv.DictReader(files[task].open())):
            enc = tok(text, truncation=True, max_length=20, return_tensors="pt")  # all it returns, as served
            ids = enc["input_ids"]
            if ids.shape[1] < 2:
                continue
            with torch.no_grad():
                total += model(**enc, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
        return total / count, count

    main(
        [
            "evaluate",
            "--checkpoint",
            str(out),
            "--tasks",
            json.dumps(tasks),
            "--max_length",
            "20",
            "--batch_size",
            "7",
            "--write",
            "true",
        ]
    )
    scores = json.loads((out / "eval_results.json").read_text())["scores"]
    for task in tasks:
        nll, count = reference(out, task)
        assert scores[task]["tokens"] == count and scores[task]["n"] == 40
        assert scores[task]["nll"] == pytest.approx(nll, rel=1e-5)
        assert scores[task]["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert scores["average"]["nll"] == pytest.approx((scores["chat"]["nll"] + scores["code"]["nll"]) / 2)
    card = (out / "README.md").read_text()
    assert "| task | NLL | perplexity |" in card and f"| chat | {scores['chat']['nll']:.4f} |" in card
    # a plain fine-tune (no manifest) is scored the same way: the reference row of a comparison
    plain = evaluate_checkpoint(paths["chat"], tasks, max_length=20)
    assert plain["chat"]["nll"] == pytest.approx(reference(paths["chat"], "chat")[0], rel=1e-5)
    with pytest.raises(MergeInputError, match="causal LM, which has no class heads"):
        evaluate_checkpoint(str(out), tasks, heads=paths)
