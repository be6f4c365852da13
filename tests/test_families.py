"""Text model families beyond BERT and Llama (which the other tests use), end to end on tiny random configs: sequence
classifiers (``seq_cls``), causal LMs (``causal_lm``) and text-to-text encoder-decoders (``seq2seq_lm``) as users
bring them from the Hub. Per family: the one-hot merge is each stock fine-tune; after 2 AdaMerging steps the export,
loaded with stock ``transformers``, holds θ0 + Σ_t λ_t,p τ_t,p computed here from stock-loaded checkpoints and the
manifest's coefficients, and gives the wrapper's logits, as ``adamerge.load_merged`` does."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from tests.conftest import WORDS, quick_fit, save_lm_zoo, text_rows

V = len(WORDS) + 5
WHOLE = {"causal_lm": "AutoModelForCausalLM", "seq2seq_lm": "AutoModelForSeq2SeqLM"}  # kinds merged whole
LAYERS = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
DECODER = dict(hidden_size=32, num_key_value_heads=2, **LAYERS)
FAMILIES = {  # name: (task_type, config class, config fields)
    "roberta": ("seq_cls", "RobertaConfig", dict(hidden_size=32, **{**LAYERS, "max_position_embeddings": 80})),
    "distilbert": (
        "seq_cls",
        "DistilBertConfig",
        dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64),
    ),
    "deberta_v2": ("seq_cls", "DebertaV2Config", dict(hidden_size=32, **LAYERS)),
    "electra": ("seq_cls", "ElectraConfig", dict(embedding_size=16, hidden_size=32, **LAYERS)),
    "albert": ("seq_cls", "AlbertConfig", dict(embedding_size=16, hidden_size=32, **LAYERS)),  # layers shared
    "modernbert": (
        "seq_cls",
        "ModernBertConfig",
        dict(hidden_size=32, global_attn_every_n_layers=1, local_attention=16, **LAYERS),
    ),
    "mpnet": ("seq_cls", "MPNetConfig", dict(hidden_size=32, **LAYERS)),
    "xlnet": ("seq_cls", "XLNetConfig", dict(d_model=32, n_layer=2, n_head=4, d_inner=64)),
    "funnel": ("seq_cls", "FunnelConfig", dict(d_model=32, n_head=4, d_head=8, d_inner=64, block_sizes=[1, 1])),
    # encoder-decoders: the classifier reads the decoder's state at the last eos ([CLS] = 2 / [SEP] = 3 here)
    "bart": (
        "seq_cls",
        "BartConfig",
        dict(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            bos_token_id=2,
            eos_token_id=3,
            decoder_start_token_id=3,
        ),
    ),
    "t5": (
        "seq_cls",
        "T5Config",
        dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, eos_token_id=3, decoder_start_token_id=0),
    ),  # T5Model needs decoder_input_ids
    # the same encoder-decoders as text-to-text models (seq2seq_lm): the logits are the first output token's
    "t5_lm": (
        "seq2seq_lm",
        "T5Config",
        dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, eos_token_id=3, decoder_start_token_id=0),
    ),
    "bart_lm": (
        "seq2seq_lm",
        "BartConfig",
        dict(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            bos_token_id=2,
            eos_token_id=3,
            decoder_start_token_id=3,
        ),
    ),
    "gpt2": ("causal_lm", "GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, n_positions=64)),  # Conv1D weights
    "qwen2": ("causal_lm", "Qwen2Config", dict(**DECODER, vocab_size=V + 8)),  # its tokenizer adds one token
    "mistral": ("causal_lm", "MistralConfig", DECODER),
    "phi3": ("causal_lm", "Phi3Config", DECODER),
    "gemma2": ("causal_lm", "Gemma2Config", dict(**DECODER, head_dim=8)),
    "gpt_neox": ("causal_lm", "GPTNeoXConfig", dict(hidden_size=32, **LAYERS)),
    "qwen3": ("causal_lm", "Qwen3Config", dict(**DECODER, head_dim=8, vocab_size=V + 8)),
    "falcon": ("causal_lm", "FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    "bloom": ("causal_lm", "BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4)),  # ALiBi, no positions
    "gptj": ("causal_lm", "GPTJConfig", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4)),
    "opt": (
        "causal_lm",
        "OPTConfig",
        dict(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_text_families_merge_export_and_load_with_stock_transformers(family, tmp_path):
    import transformers

    from adamerge import load_merged
    from adamerge.io.datasets import TaskData
    from adamerge.methods import AdaMerging
    from adamerge.training.datamodule import UnlabeledDataModule

    task_type, config_name, fields = FAMILIES[family]
    whole = task_type in WHOLE  # the whole model is merged: no per-task heads, the export's root is every task's
    auto = getattr(transformers, WHOLE.get(task_type, "AutoModelForSequenceClassification"))

    def model():
        return auto.from_config(getattr(transformers, config_name)(**{"vocab_size": V, "pad_token_id": 0, **fields}))

    base_path, models = save_lm_zoo(tmp_path, model, ("a", "b"))
    base = auto.from_pretrained(base_path).eval()
    data = {}
    for i, task in enumerate(models):
        data[task] = str(tmp_path / f"{task}.csv")
        with open(data[task], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows([t, j % 2] for j, t in enumerate(text_rows(16, seed=i)))

    module = AdaMerging(
        base_path,
        models,
        granularity="layer",
        init=0.3,
        lr=0.05,
        task_type=task_type,
        **({"objective": "kl"} if whole else {}),
    )
    tok = transformers.AutoTokenizer.from_pretrained(base_path)
    x = {
        k: v
        for k, v in tok([" ".join(WORDS[:7]), " ".join(WORDS[5:9])], return_tensors="pt", padding=True).items()
        if k in ("input_ids", "attention_mask")
    }
    # stock seq2seq models are handed the decoder's start token here: logits of the first output token, [2, 1, V]
    xs = (
        {**x, "decoder_input_ids": torch.full((2, 1), fields["decoder_start_token_id"])}
        if task_type == "seq2seq_lm"
        else x
    )
    for task in models:
        ft = auto.from_pretrained(models[task]).eval()
        with torch.no_grad():
            torch.testing.assert_close(
                module.predict(task, x, module.merged.merged_params(module.merged.one_hot(task))),
                ft(**xs).logits,
                atol=1e-5,
                rtol=1e-5,
            )
    dm = UnlabeledDataModule(
        {t: TaskData(p) for t, p in data.items()}, tokenizer=base_path, samples_per_task=4, max_length=16
    )
    quick_fit(module, dm, steps=2)
    out = module.export(tmp_path / "merged")
    module.eval()

    coef = json.loads((out / "merge_manifest.json").read_text())["coefficients"]
    lam = torch.tensor(coef["effective"], dtype=torch.float64)
    assert coef["tasks"] == list(models) and (lam - 0.3).abs().max() > 1e-4  # trained: not θ0 + 0.3 Σ τ
    theta0 = dict(base.named_parameters())
    prefix = "" if whole else base.base_model_prefix + "."
    assert sorted(coef["params"]) == sorted(n[len(prefix) :] for n in theta0 if n.startswith(prefix))
    fts = {t: dict(auto.from_pretrained(p).named_parameters()) for t, p in models.items()}
    for task in models:
        stock = auto.from_pretrained(str(out if whole else out / "tasks" / task)).eval()
        exported = dict(stock.named_parameters())
        for j, name in enumerate(coef["params"]):
            key = name if name in exported else f"{stock.base_model_prefix}.{name}"
            ref = theta0[key].double() + sum(
                lam[i, j] * (fts[t][key].double() - theta0[key].double()) for i, t in enumerate(models)
            )
            torch.testing.assert_close(exported[key].double(), ref, atol=1e-6, rtol=1e-6)
        with torch.no_grad():
            wrapper = module.predict(task, x)
            torch.testing.assert_close(stock(**xs).logits, wrapper, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(load_merged(out).predict(task, **x), wrapper, atol=1e-5, rtol=1e-5)


def test_a_seq2seq_model_without_a_decoder_start_token_is_refused_by_name(tmp_path):
    """The first output token is decoded from the config's decoder_start_token_id: a model without one is refused
    before anything is merged, naming the model and the field."""
    from adamerge.errors import MergeInputError
    from adamerge.methods import TaskArithmetic
    from tests.conftest import tiny_t5

    base, models = save_lm_zoo(tmp_path, tiny_t5, ("a",))
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "decoder_start_token_id": None}))
    with pytest.raises(MergeInputError, match=r"base.*decoder_start_token_id"):
        TaskArithmetic(base, models, task_type="seq2seq_lm")
