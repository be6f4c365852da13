"""Tiny, randomly initialised Hugging Face models and data, built on CPU in a few seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "good bad great awful fine poor love hate movie film plot actor spam free win prize call now hello "
    "friend meet lunch what who where when why how many city country person number the a is was and"
).split()
TASKS = {"sentiment": 2, "topic": 3, "spam": 2}


def make_tokenizer(path):
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    path.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)  # (transformers 5 ignores a
    assert len(tok) == len(vocab)  # `vocab_file=` here)
    tok.save_pretrained(str(path))
    return tok


def tiny_config(num_labels=2):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def build_zoo(root, tasks=TASKS, scale=0.05, seed=0):
    """Save a base model and one 'fine-tune' per task (base + a random task vector, own head)."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    tok = make_tokenizer(root / "base")
    base = BertForSequenceClassification(tiny_config())
    base.save_pretrained(str(root / "base"))
    paths = {}
    for i, (task, n) in enumerate(tasks.items()):
        ft = BertForSequenceClassification(tiny_config(n))
        sd = {k: v for k, v in base.state_dict().items() if k.startswith("bert.")}
        g = torch.Generator().manual_seed(100 + i)
        ft.load_state_dict(
            {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in sd.items()},
            strict=False,
        )
        ft.save_pretrained(str(root / task))
        tok.save_pretrained(str(root / task))
        paths[task] = str(root / task)
    return str(root / "base"), paths


def tiny_llama(tied: bool = True):
    """A tiny random LlamaForCausalLM over :data:`WORDS`' vocabulary (``tied``: input and output embeddings shared)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(WORDS) + 5,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=tied,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    )


def tiny_t5():
    """A tiny random T5ForConditionalGeneration over :data:`WORDS`' vocabulary (decoder start = pad, as T5's)."""
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=len(WORDS) + 5,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=3,
            decoder_start_token_id=0,
        )
    )


def save_lm_zoo(root, make_model, tasks):
    """Save ``make_model()`` as the base and, per task, the base plus seeded noise (0.05) on its parameters (buffers
    such as BART's ``final_logits_bias`` are not trained), each with the tokenizer: ``(base path, {task: path})`` for
    tests over a text model (causal LMs, sequence classifiers, seq2seq LMs)."""
    torch.manual_seed(0)
    base = make_model()
    make_tokenizer(root / "base")
    base.save_pretrained(str(root / "base"))
    paths = {}
    for i, task in enumerate(tasks):
        g = torch.Generator().manual_seed(10 + i)
        ft = make_model()
        params = {n for n, _ in base.named_parameters(remove_duplicate=False)}
        ft.load_state_dict(
            {
                k: v + 0.05 * torch.randn(v.shape, generator=g) if k in params else v
                for k, v in base.state_dict().items()
            }
        )
        ft.save_pretrained(str(root / task))
        make_tokenizer(root / task)
        paths[task] = str(root / task)
    return str(root / "base"), paths


def image_rows(n, seed):
    """``n`` random 28x28 grayscale PIL images (as MNIST's)."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray((rng.random((28, 28)) * 255).astype("uint8")) for _ in range(n)]


def save_image_data(path, classnames, n=24, seed=0, splits=None):
    """Save ``n`` random images with a ``label`` ClassLabel of ``classnames`` at ``path`` (``save_to_disk``; a
    ``DatasetDict`` with those rows under each of ``splits`` when given); the path as a string."""
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(classnames))})
    ds = datasets.Dataset.from_dict(
        {"image": image_rows(n, seed), "label": [i % len(classnames) for i in range(n)]}, features=feats
    )
    (datasets.DatasetDict({s: ds for s in splits}) if splits else ds).save_to_disk(str(path))
    return str(path)


def perturb(module, scale, seed):
    """Add seeded Gaussian noise of std ``scale`` to every parameter of ``module`` (a tiny 'fine-tune')."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def build_clip_zoo(root, classes, splits=None, family="clip"):
    """A tiny random CLIPModel base (with tokenizer and image processor) and one CLIPVisionModel fine-tune and one
    image dataset per task of ``classes`` ({task: class names}): {"base", "models", "data", "root"}.
    ``family="siglip"`` / ``"siglip2"``: a SiglipModel / Siglip2Model base and its vision-tower fine-tunes."""
    import json

    import transformers
    from transformers import CLIPImageProcessor, CLIPTokenizer

    base = root / "base"
    base.mkdir(parents=True)
    chars = [chr(i) for i in range(33, 127)]  # printable ASCII: byte-level BPE maps these bytes to themselves
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (base / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(vocab)}))
    (base / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(base / "vocab.json"), str(base / "merges.txt"))
    eos = len(vocab) - 1
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=40,
        eos_token_id=eos,
        bos_token_id=eos - 1,
        pad_token_id=eos,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    if family == "siglip":
        cfg = transformers.SiglipConfig(text_config=text, vision_config=vision)
        model_cls, vision_cls = transformers.SiglipModel, transformers.SiglipVisionModel
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    elif family == "siglip2":  # NaFlex: 16 patches of 8×8 per image, their mask and grid
        cfg = transformers.Siglip2Config(text_config=text, vision_config={**vision, "num_patches": 16})
        model_cls, vision_cls = transformers.Siglip2Model, transformers.Siglip2VisionModel
        pil = getattr(transformers, "Siglip2ImageProcessorPil", None)  # without torchvision, the processor it uses
        processor = (pil or transformers.Siglip2ImageProcessor)(patch_size=8, max_num_patches=16)
    else:
        cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        model_cls, vision_cls = transformers.CLIPModel, transformers.CLIPVisionModel
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    processor.save_pretrained(str(base))
    models, data = {}, {}
    for i, (task, names) in enumerate(classes.items()):
        ft = vision_cls(cfg.vision_config)
        ft.load_state_dict(model.vision_model.state_dict())
        perturb(ft, 0.05, seed=i + 1)
        ft.save_pretrained(str(root / task))
        models[task] = str(root / task)
        data[task] = save_image_data(root / f"data_{task}", names, seed=i, splits=splits)
    return {"base": str(base), "models": models, "data": data, "root": root}


def text_rows(n, seed=0):
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


BATCH_TEXTS = [
    "good movie great plot",
    "the film was awful",
    "who is the actor",
    "where is the city now",
    "free prize call now",
    "hello friend meet lunch",
]


def mixed_batch(base: str, rotate: int = 0) -> dict:
    """Two rows per task of :data:`TASKS` in one batch (texts rotated by ``rotate``), as the data module yields."""
    from transformers import AutoTokenizer

    texts = BATCH_TEXTS[rotate:] + BATCH_TEXTS[:rotate]
    enc = AutoTokenizer.from_pretrained(base)(texts, padding=True, return_tensors="pt")
    return {"inputs": dict(enc), "tasks": list(TASKS), "sizes": [2] * len(TASKS)}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return build_zoo(root)


@pytest.fixture(scope="session")
def task_data(tmp_path_factory):
    """One small csv per task with a text and a label column."""
    import csv

    root = tmp_path_factory.mktemp("data")
    out = {}
    for i, task in enumerate(TASKS):
        p = root / f"{task}.csv"
        with p.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for j, t in enumerate(text_rows(40, seed=i)):
                w.writerow([t, j % 2])
        out[task] = str(p)
    return out


def fit_coefficients(module, zoo, task_data, steps: int = 3):
    """Train ``module`` ``steps`` steps on 4 rows per task of ``task_data``; its coefficients afterwards."""
    from adamerge.io.datasets import TaskData
    from adamerge.training.datamodule import UnlabeledDataModule

    dm = UnlabeledDataModule(
        {t: TaskData(p) for t, p in task_data.items()}, tokenizer=zoo[0], samples_per_task=4, max_length=16
    )
    quick_fit(module, dm, steps)
    return module.merged.coefficients.weight.detach()


def quick_fit(module, datamodule, steps: int, seed: int = 0):
    """Train ``module`` for ``steps`` steps on CPU, silently."""
    import pytorch_lightning as pl

    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


@pytest.fixture(autouse=True)
def _close_wandb_run():
    """A W&B run left open by one test would be reused by the next test's WandbLogger (its files elsewhere)."""
    yield
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
