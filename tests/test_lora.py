"""LoRA task vectors: low-rank storage, one-hot equals peft's merge_and_unload, exports to a full model and to PEFT
adapters that peft loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adamerge.core.functional import merge_low_rank
from adamerge.io.datasets import TaskData
from adamerge.methods import AdaMerging, TaskArithmetic
from adamerge.training.datamodule import UnlabeledDataModule

TASKS = {"sentiment": 2, "topic": 3}


def make_adapter(base_dir, path, num_labels, seed, r=4, targets=("query", "value")):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=num_labels, ignore_mismatched_sizes=True
    )
    peft_model = get_peft_model(
        model,
        LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False),
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "classifier" in n and p.requires_grad:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def adapters(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = zoo[0]
    return base, {
        t: make_adapter(base, root / t, n, seed=i, targets=("query", "value") if i == 0 else ("query", "key"))
        for i, (t, n) in enumerate(TASKS.items())
    }


@pytest.fixture(scope="module")
def batch(zoo, task_data):
    dm = UnlabeledDataModule(
        {t: TaskData(task_data[t]) for t in TASKS}, tokenizer=zoo[0], samples_per_task=4, max_length=16
    )
    dm.setup()
    return dm.dataset[0]


def peft_merged(base, adapter, num_labels):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=num_labels, ignore_mismatched_sizes=True
    )
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


def assert_exports_give_the_merge(module, base, batch, out):
    """Export ``module`` with PEFT adapters; on each task's rows of ``batch`` the full per-task model (stock
    transformers) and the adapter on the base (stock peft) give the merge's logits."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    with torch.no_grad():
        expected = module.merged(batch["inputs"], batch["tasks"], batch["sizes"])
    module.export(out, lora_adapters=True)
    for i, (task, n) in enumerate(TASKS.items()):
        rows = {k: v[4 * i : 4 * i + 4] for k, v in batch["inputs"].items()}
        full = AutoModelForSequenceClassification.from_pretrained(str(out / "tasks" / task)).eval()
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=n, ignore_mismatched_sizes=True)
        adapter = PeftModel.from_pretrained(model, str(out / "adapters" / task)).eval()
        with torch.no_grad():
            assert (full(**rows).logits - expected[task]).abs().max() < 1e-5, task
            assert (adapter(**rows).logits - expected[task]).abs().max() < 1e-5, task


def test_merge_low_rank_formula():
    base = torch.zeros(3, 2)
    B, A = torch.randn(2, 3, 4), torch.randn(2, 4, 2)
    lam = torch.tensor([0.5, -2.0])
    expected = 0.5 * B[0] @ A[0] - 2.0 * B[1] @ A[1]
    torch.testing.assert_close(merge_low_rank(base, B, A, lam), expected)


def test_lora_task_vectors_stay_low_rank_and_one_hot_equals_merge_and_unload(adapters, batch):
    base, paths = adapters
    module = AdaMerging(base, paths, granularity="layer")
    merged = module.merged
    assert merged.task_vectors() == {}  # nothing dense: only LoRA factors
    # query is targeted by both adapters, value and key by one each (zero factors for the other)
    assert sorted(n.split(".")[-2] for n in merged.low_rank_names) == ["key"] * 2 + ["query"] * 2 + ["value"] * 2
    B, A = merged.low_rank_factors("encoder.layer.0.attention.self.value.weight")
    assert B.shape == (2, 32, 4) and A.shape == (2, 4, 32) and not B[1].any()
    for i, (task, n) in enumerate(TASKS.items()):
        ref = peft_merged(base, paths[task], n)
        rows = {k: v[4 * i : 4 * i + 4] for k, v in batch["inputs"].items()}
        with torch.no_grad():
            expected = ref(**rows).logits
            got = merged(batch["inputs"], batch["tasks"], batch["sizes"], coefficients=merged.one_hot(task))[task]
        assert (got - expected).abs().max() < 1e-5, task


def test_lora_merge_exports_full_model_and_peft_adapters(adapters, batch, tmp_path):

    base, paths = adapters
    module = TaskArithmetic(base, paths, scale=0.6)
    assert_exports_give_the_merge(module, base, batch, tmp_path / "out")
    import json

    manifest = json.loads((tmp_path / "out" / "merge_manifest.json").read_text())
    assert manifest["extra"] == ["adapters/sentiment", "adapters/topic"]


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("Ties", {"prep": {"ties_density": 0.2, "ties_scope": "tensor"}, "scale": 1.0}),
        ("TSVM", {"scale": 1.0}),
    ],
)
def test_dense_methods_on_lora_equal_the_same_merge_of_peft_merged_models(adapters, batch, tmp_path, method, kwargs):
    """TIES and TSV-M need dense task vectors: over adapters they merge the products B A, exactly as over the full
    models that peft's merge_and_unload makes of the same adapters (saved and loaded as plain fine-tunes)."""
    import adamerge.methods as methods

    base, paths = adapters
    full = {}
    for task, n in TASKS.items():
        full[task] = str(tmp_path / task)
        peft_merged(base, paths[task], n).save_pretrained(full[task])
    cls = getattr(methods, method)
    from_adapters, from_full = cls(base, paths, **kwargs).merged, cls(base, full, **kwargs).merged
    assert not from_adapters.low_rank_names and from_adapters.task_vectors()  # stored dense
    with torch.no_grad():
        got = from_adapters(batch["inputs"], batch["tasks"], batch["sizes"])
        expected = from_full(batch["inputs"], batch["tasks"], batch["sizes"])
    for task in TASKS:
        assert (got[task] - expected[task]).abs().max() < 1e-5, task


def test_guided_recipe_on_lora_exports_a_full_model_and_peft_adapters_with_equal_logits(zoo, task_data, tmp_path):
    """The recipe `adamerge init` writes for LoRA adapters of a BERT-style classifier (layer-wise coefficients, KL to
    the experts, tuned heads, each head with its fine-tune's pooler), trained a few steps on adapters that also adapt
    the pooler (``dense``): the full per-task model that stock transformers loads and the PEFT adapter that stock
    peft loads onto the base give the trained merge's logits."""
    from conftest import quick_fit

    base = zoo[0]
    paths = {
        t: make_adapter(base, tmp_path / "in" / t, n, seed=i, targets=("query", "value", "dense"))
        for i, (t, n) in enumerate(TASKS.items())
    }
    module = AdaMerging(
        base,
        paths,
        granularity="layer",
        objective={"name": "kl", "temperature": 2.0},
        tune_heads=True,
        heads={"pooler": True},
        lr=0.05,
    )
    assert module.merged.low_rank_names and not module.merged.task_vectors()  # kept low-rank
    heads_before = {n: p.detach().clone() for n, p in module.named_parameters() if "heads" in n}
    dm = UnlabeledDataModule(
        {t: TaskData(task_data[t]) for t in TASKS}, tokenizer=base, samples_per_task=4, max_length=16
    )
    quick_fit(module, dm, steps=3)
    assert any(not torch.equal(p, heads_before[n]) for n, p in module.named_parameters() if n in heads_before)
    dm.setup()
    batch = dm.dataset[0]
    assert_exports_give_the_merge(module, base, batch, tmp_path / "out")


def test_recompute_merges_low_rank_layers_to_the_same_gradient(adapters, batch):
    """LoRA factors merged inside each layer's checkpoint (``recompute: merge``), one task group at a time: the
    plain step's coefficient gradient."""
    base, paths = adapters
    grads = []
    for recompute, chunks in ((None, 1), ("merge", 1), ("merge", 2)):
        module = AdaMerging(base, paths, granularity="layer", recompute=recompute, task_chunks=chunks)
        assert [p for _, p in module.merged.layer_stores] == ["encoder.layer.0", "encoder.layer.1"]
        torch.manual_seed(0)
        module.merged.coefficients.weight.data += 0.1 * torch.randn_like(module.merged.coefficients.weight)
        loss = module.training_step(batch, 0)
        loss.backward()
        grads.append(module.merged.coefficients.weight.grad.clone())
    assert grads[0].abs().max() > 1e-5
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], atol=1e-7, rtol=1e-5)


def random_adapters(base, root, auto, tasks=("a", "b"), **lora) -> dict[str, str]:
    """Per task a peft LoRA adapter (``lora``: LoraConfig fields, r = 4) of ``auto.from_pretrained(base)`` with random
    factors and, where it saves modules (a classifier), random values there too: ``{task: path}``."""
    from peft import LoraConfig, get_peft_model

    paths = {}
    for i, task in enumerate(tasks):
        torch.manual_seed(i)
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora)
        model = get_peft_model(auto.from_pretrained(base), config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "modules_to_save" in n:
                    p.normal_(0, 0.5)
        model.save_pretrained(str(root / task))
        paths[task] = str(root / task)
    return paths


def test_adapter_heads_keep_the_bases_modules_peft_did_not_save(tmp_path):
    """DeBERTa-v2's classifier reads a ``pooler`` outside its backbone that peft's SEQ_CLS adapters do not save
    (modules_to_save is ``classifier``): it stayed the base's while the adapter trained, so the merge takes it from
    the base (one-hot = peft's merge_and_unload); a base without it (a bare encoder: transformers initialises the
    pooler at random) is refused, naming the tensors."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, DebertaV2Config

    from adamerge.errors import MergeInputError
    from tests.conftest import WORDS, save_lm_zoo

    config = DebertaV2Config(
        vocab_size=len(WORDS) + 5,
        pad_token_id=0,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    base, _ = save_lm_zoo(tmp_path, lambda: AutoModelForSequenceClassification.from_config(config), ())
    paths = random_adapters(
        base,
        tmp_path,
        AutoModelForSequenceClassification,
        task_type="SEQ_CLS",
        target_modules=["query_proj", "value_proj"],
    )
    saved = load_file(str(Path(paths["a"]) / "adapter_model.safetensors"))
    assert any("classifier" in k for k in saved) and not any("pooler" in k for k in saved)
    module = TaskArithmetic(base, paths, scale=1.0)
    x = dict(
        AutoTokenizer.from_pretrained(base)(["good movie great plot", "free prize"], return_tensors="pt", padding=True)
    )
    for task in paths:
        ref = (
            PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), paths[task])
            .merge_and_unload()
            .eval()
        )
        with torch.no_grad():
            got = module.predict(task, x, module.merged.merged_params(module.merged.one_hot(task)))
            torch.testing.assert_close(got, ref(**x).logits, atol=1e-5, rtol=1e-5)

    bare = tmp_path / "bare"
    AutoModel.from_pretrained(base).save_pretrained(str(bare))  # the encoder alone: no pooler, no classifier
    AutoTokenizer.from_pretrained(base).save_pretrained(str(bare))
    with pytest.raises(MergeInputError, match=r"adapter 'a' .* does not save the head tensors \['pooler\.dense\.bias'"):
        TaskArithmetic(str(bare), paths, scale=1.0)


def test_seq2seq_lora_adapters_merge_as_peft_does_and_export_as_adapters(tmp_path):
    """Flan-T5-style LoRA (peft SEQ_2_SEQ_LM on T5's q/v): the one-hot merge is peft's merge_and_unload (first output
    token's logits); a TA merge exports a full AutoModelForSeq2SeqLM and PEFT adapters that give the same logits;
    `adamerge evaluate` scores the first output token among each class's answer word."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from adamerge.errors import MergeInputError
    from adamerge.evaluate import evaluate_checkpoint
    from tests.conftest import save_lm_zoo, tiny_t5

    base, _ = save_lm_zoo(tmp_path, tiny_t5, ())
    paths = random_adapters(base, tmp_path, AutoModelForSeq2SeqLM, task_type="SEQ_2_SEQ_LM", target_modules=["q", "v"])
    x = {
        k: v
        for k, v in AutoTokenizer.from_pretrained(base)(
            ["good movie great plot", "free prize"], return_tensors="pt", padding=True
        ).items()
        if k in ("input_ids", "attention_mask")
    }
    xs = {**x, "decoder_input_ids": torch.zeros(2, 1, dtype=torch.long)}
    module = TaskArithmetic(base, paths, scale=0.6, task_type="seq2seq_lm").eval()
    assert module.merged.task_vectors() == {}  # low-rank only
    for task in paths:
        ref = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base), paths[task]).merge_and_unload()
        with torch.no_grad():
            got = module.predict(task, x, module.merged.merged_params(module.merged.one_hot(task)))
            torch.testing.assert_close(got, ref.eval()(**xs).logits, atol=1e-5, rtol=1e-5)
    out = module.export(tmp_path / "out", lora_adapters=True)
    with torch.no_grad():
        expected = module.predict("a", x)
        full = AutoModelForSeq2SeqLM.from_pretrained(str(out)).eval()
        torch.testing.assert_close(full(**xs).logits, expected, atol=1e-5, rtol=1e-5)
        for task in paths:
            adapter = PeftModel.from_pretrained(
                AutoModelForSeq2SeqLM.from_pretrained(base), str(out / "adapters" / task)
            ).eval()
            torch.testing.assert_close(adapter(**xs).logits, expected, atol=1e-5, rtol=1e-5)

    # evaluate: the first output token among the answers' first tokens, against the stock model one row at a time,
    # for the export and for a plain seq2seq directory (the base)
    from tests.conftest import text_rows

    texts = text_rows(12, seed=3)
    data = tmp_path / "eval.csv"
    data.write_text("text,label\n" + "".join(f"{x},{i % 2}\n" for i, x in enumerate(texts)))
    tok = AutoTokenizer.from_pretrained(base)
    ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in ("good", "bad")]
    for checkpoint in (out, base):
        stock = AutoModelForSeq2SeqLM.from_pretrained(str(checkpoint)).eval()
        with torch.no_grad():
            preds = [
                int(
                    stock(**tok(x, return_tensors="pt"), decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))
                    .logits[0, 0, ids]
                    .argmax()
                )
                for x in texts
            ]
        got = evaluate_checkpoint(str(checkpoint), {"a": {"path": str(data), "answers": ["good", "bad"]}})["a"]
        assert got["predicted"] == [preds.count(0), preds.count(1)]
        assert got["accuracy"] == pytest.approx(sum(p == i % 2 for i, p in enumerate(preds)) / len(texts))
    with pytest.raises(MergeInputError, match=r"task 'a': a seq2seq LM is scored on its first output token"):
        evaluate_checkpoint(str(out), {"a": {"path": str(data)}})
    with pytest.raises(MergeInputError, match=r"answers must start with distinct tokens"):  # both [UNK]
        evaluate_checkpoint(str(out), {"a": {"path": str(data), "answers": ["zebra", "quokka"]}})
