"""Image model kinds end to end on tiny random models: CLIP (vision tower merged, zero-shot heads from the text tower)
and AutoModelForImageClassification (own heads), with image data from ``datasets`` (Image features)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adamerge.errors import MergeInputError
from tests.conftest import build_clip_zoo, image_rows, perturb, save_image_data

CLASSES = {"digits": ["zero", "one", "two"], "shapes": ["circle", "square", "triangle", "star"]}


def _image_data(root, task, n=24, seed=0):
    return save_image_data(root / f"data_{task}", CLASSES[task], n=n, seed=seed)


@pytest.fixture(scope="module")
def clip_zoo(tmp_path_factory):
    """A tiny random CLIPModel base (with tokenizer and image processor) and two CLIPVisionModel fine-tunes."""
    return build_clip_zoo(tmp_path_factory.mktemp("clip"), CLASSES)


def _heads(templates=None):
    return {t: {"classnames": names, **({"templates": templates} if templates else {})} for t, names in CLASSES.items()}


def _pixels(base, n=6, seed=5):
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(base)
    return proc(images=[im.convert("RGB") for im in image_rows(n, seed)], return_tensors="pt")["pixel_values"]


def test_clip_zero_shot_head_equals_stock_clip_logits(clip_zoo):
    """With one template and the merge at the base (λ = 0), the wrapper's logits are stock CLIPModel's zero-shot
    logits_per_image for the prompts "a photo of a {class}." — computed by transformers alone."""
    from transformers import AutoTokenizer, CLIPModel

    from adamerge.methods import TaskArithmetic

    module = TaskArithmetic(
        clip_zoo["base"], clip_zoo["models"], scale=0.0, task_type="clip", heads=_heads(["a photo of a {}."])
    ).eval()
    clip = CLIPModel.from_pretrained(clip_zoo["base"]).eval()
    tok = AutoTokenizer.from_pretrained(clip_zoo["base"])
    x = _pixels(clip_zoo["base"])
    for task, names in CLASSES.items():
        prompts = tok([f"a photo of a {c}." for c in names], padding=True, return_tensors="pt")
        with torch.no_grad():
            ref = clip(
                input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], pixel_values=x
            ).logits_per_image
            got = module.predict(task, {"pixel_values": x})
        assert got.shape == (6, len(names))
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_clip_zero_shot_head_averages_normalised_template_embeddings(clip_zoo):
    """Several templates: each class row is the normalised mean of the normalised prompt embeddings (by hand)."""
    from transformers import AutoTokenizer, CLIPModel

    from adamerge.methods import TaskArithmetic

    templates = ["a photo of a {}.", "a drawing of the {}!", "{}"]
    module = TaskArithmetic(clip_zoo["base"], clip_zoo["models"], scale=0.3, task_type="clip", heads=_heads(templates))
    clip = CLIPModel.from_pretrained(clip_zoo["base"]).eval()
    tok = AutoTokenizer.from_pretrained(clip_zoo["base"])
    for task, names in CLASSES.items():
        rows = []
        for c in names:
            embs = []
            for t in templates:  # one prompt at a time: no padding involved
                with torch.no_grad():
                    out = clip.text_model(**tok([t.format(c)], return_tensors="pt")).pooler_output
                    e = clip.text_projection(out)[0]
                embs.append(e / e.norm())
            m = torch.stack(embs).mean(0)
            rows.append(m / m.norm())
        head = module.merged.heads[task]
        torch.testing.assert_close(head.weight, torch.stack(rows), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(head.logit_scale, clip.logit_scale.exp())
        assert not any(p.requires_grad for p in head.parameters())


def test_clip_fit_export_load_and_stock_recipe_agree(clip_zoo, tmp_path):
    """Layer-wise AdaMerging on unlabeled images (3 steps) moves the coefficients; the export served by
    load_merged, and by the stock-transformers recipe of the docs (CLIPVisionModel + heads.safetensors), gives
    the wrapper's logits."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    from adamerge import load_merged, read_manifest
    from adamerge.io.datasets import TaskData
    from adamerge.methods import AdaMerging
    from adamerge.training.datamodule import UnlabeledDataModule
    from tests.conftest import quick_fit

    heads = {
        "digits": {"classnames": CLASSES["digits"], "templates": "mnist"},
        "shapes": {"dataset": {"path": clip_zoo["data"]["shapes"], "label_column": "label"}},
    }
    module = AdaMerging(
        clip_zoo["base"], clip_zoo["models"], granularity="layer", init=0.3, lr=0.05, task_type="clip", heads=heads
    )
    assert module.merged.heads["shapes"].classnames == CLASSES["shapes"]  # ClassLabel names
    dm = UnlabeledDataModule(
        {t: TaskData(path=p, image_column="image") for t, p in clip_zoo["data"].items()},
        tokenizer=clip_zoo["base"],
        samples_per_task=4,
    )
    before = module.merged.coefficients.matrix().detach().clone()
    quick_fit(module, dm, steps=3)
    assert not torch.allclose(module.merged.coefficients.matrix().detach(), before)
    out = module.export(tmp_path / "merged")
    manifest = read_manifest(out)
    assert manifest["task_type"] == "clip" and manifest["per_task_models"] is False
    assert manifest["heads"]["digits"]["templates"][0] == 'a photo of the number: "{}".'
    assert (out / "preprocessor_config.json").is_file()
    x = _pixels(clip_zoo["base"], seed=9)
    module.eval()
    served = load_merged(out)
    vision = CLIPVisionModel.from_pretrained(str(out)).eval()
    tensors = load_file(str(out / "heads.safetensors"))
    for task in CLASSES:
        with torch.no_grad():
            ref = module.predict(task, {"pixel_values": x})
            emb = vision(pixel_values=x).pooler_output @ tensors[f"{task}/visual_projection.weight"].T
            stock = (
                tensors[f"{task}/logit_scale"]
                * torch.nn.functional.normalize(emb, dim=-1)
                @ tensors[f"{task}/weight"].T
            )
        torch.testing.assert_close(served.predict(task, pixel_values=x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stock, ref, atol=1e-5, rtol=1e-5)


def test_siglip_zero_shot_heads_fit_export_and_stock_recipe_agree(tmp_path):
    """SigLIP under task_type clip: at λ = 0 with one template the wrapper's logits are stock SiglipModel's
    logits_per_image for the prompts padded to the text tower's length (no projection, plus logit_bias); after 3
    AdaMerging steps the export — a stock SiglipVisionModel + heads.safetensors with the bias — and load_merged give
    the wrapper's logits."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer, SiglipModel, SiglipVisionModel

    from adamerge import load_merged
    from adamerge.io.datasets import TaskData
    from adamerge.methods import AdaMerging, TaskArithmetic
    from adamerge.training.datamodule import UnlabeledDataModule
    from tests.conftest import quick_fit

    zoo = build_clip_zoo(tmp_path / "zoo", CLASSES, family="siglip")
    x = _pixels(zoo["base"])
    siglip = SiglipModel.from_pretrained(zoo["base"]).eval()
    with torch.no_grad():
        siglip.logit_bias.fill_(0.7)  # a bias that matters (SigLIP's init is 0): saved as the base
    siglip.save_pretrained(zoo["base"])
    tok = AutoTokenizer.from_pretrained(zoo["base"])
    module = TaskArithmetic(
        zoo["base"], zoo["models"], scale=0.0, task_type="clip", heads=_heads(["a photo of a {}."])
    ).eval()
    for task, names in CLASSES.items():
        prompts = tok(
            [f"a photo of a {c}." for c in names], padding="max_length", max_length=40, return_tensors="pt"
        )  # the text tower's length, as SigLIP was trained
        with torch.no_grad():
            ref = siglip(input_ids=prompts["input_ids"], pixel_values=x).logits_per_image
            got = module.predict(task, {"pixel_values": x})
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert module.merged.heads[task].logit_bias.item() == pytest.approx(0.7)

    module = AdaMerging(
        zoo["base"], zoo["models"], granularity="layer", init=0.3, lr=0.05, task_type="clip", heads=_heads()
    )
    dm = UnlabeledDataModule(
        {t: TaskData(path=p, image_column="image") for t, p in zoo["data"].items()},
        tokenizer=zoo["base"],
        samples_per_task=4,
    )
    quick_fit(module, dm, steps=3)
    out = module.export(tmp_path / "merged")
    module.eval()
    vision = AutoModel.from_pretrained(str(out)).eval()
    assert isinstance(vision, SiglipVisionModel)
    tensors = load_file(str(out / "heads.safetensors"))
    served = load_merged(out)
    for task in CLASSES:
        with torch.no_grad():
            wrapper = module.predict(task, {"pixel_values": x})
            emb = vision(pixel_values=x).pooler_output @ tensors[f"{task}/visual_projection.weight"].T
            stock = (
                tensors[f"{task}/logit_scale"]
                * torch.nn.functional.normalize(emb, dim=-1)
                @ tensors[f"{task}/weight"].T
                + tensors[f"{task}/logit_bias"]
            )
            torch.testing.assert_close(stock, wrapper, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(served.predict(task, pixel_values=x), wrapper, atol=1e-5, rtol=1e-5)
    # WEMoE's default modules route the encoder layers' MLPs, not the MLP of SigLIP's attention-pooling head
    from adamerge.methods import WEMoE

    routed = WEMoE(zoo["base"], zoo["models"], task_type="clip", heads=_heads()).routing.names
    assert sorted(routed) == [f"encoder.layers.{i}.mlp.fc{j}" for i in (0, 1) for j in (1, 2)]


def test_siglip2_naflex_inputs_reach_the_merged_tower_in_training_and_serving(tmp_path):
    """SigLIP 2's vision tower reads the processor's pixel_attention_mask and spatial_shapes beside its patches: at
    λ = 0 the wrapper's logits on the processor's output are stock Siglip2Model's logits_per_image; the unlabeled data
    module hands the tower all three (2 AdaMerging steps train) and load_merged serves the export on them."""
    from transformers import AutoImageProcessor, AutoTokenizer, Siglip2Model

    from adamerge import load_merged
    from adamerge.io.datasets import TaskData
    from adamerge.methods import AdaMerging, TaskArithmetic
    from adamerge.training.datamodule import UnlabeledDataModule
    from tests.conftest import quick_fit

    zoo = build_clip_zoo(tmp_path / "zoo", CLASSES, family="siglip2")
    proc = AutoImageProcessor.from_pretrained(zoo["base"])
    x = dict(proc(images=[im.convert("RGB") for im in image_rows(4, 5)], return_tensors="pt"))
    assert set(x) == {"pixel_values", "pixel_attention_mask", "spatial_shapes"}
    siglip = Siglip2Model.from_pretrained(zoo["base"]).eval()
    tok = AutoTokenizer.from_pretrained(zoo["base"])
    module = TaskArithmetic(
        zoo["base"], zoo["models"], scale=0.0, task_type="clip", heads=_heads(["a photo of a {}."])
    ).eval()
    for task, names in CLASSES.items():
        prompts = tok([f"a photo of a {c}." for c in names], padding="max_length", max_length=40, return_tensors="pt")
        with torch.no_grad():
            ref = siglip(input_ids=prompts["input_ids"], **x).logits_per_image
            torch.testing.assert_close(module.predict(task, x), ref, atol=1e-5, rtol=1e-5)

    module = AdaMerging(
        zoo["base"], zoo["models"], granularity="layer", init=0.3, lr=0.05, task_type="clip", heads=_heads()
    )
    dm = UnlabeledDataModule(
        {t: TaskData(path=p, image_column="image") for t, p in zoo["data"].items()},
        tokenizer=zoo["base"],
        samples_per_task=4,
    )
    dm.setup()
    assert set(dm.dataset[0]["inputs"]) == {"pixel_values", "pixel_attention_mask", "spatial_shapes"}
    before = module.merged.coefficients.matrix().detach().clone()
    quick_fit(module, dm, steps=2)
    assert not torch.allclose(module.merged.coefficients.matrix().detach(), before)
    out = module.export(tmp_path / "merged")
    module.eval()
    served = load_merged(out)
    for task in CLASSES:
        with torch.no_grad():
            torch.testing.assert_close(served.predict(task, **x), module.predict(task, x), atol=1e-5, rtol=1e-5)

    # WEMoE's routers average over the valid patches only: a wide image leaves half of the 16 patches padding, and
    # whatever those hold changes nothing (the tower's attention and pooling mask them too); the valid ones do
    from PIL import Image

    from adamerge.methods import WEMoE

    wemoe = WEMoE(zoo["base"], zoo["models"], task_type="clip", heads=_heads()).eval()
    with torch.no_grad():
        for router in wemoe.routing.routers.values():  # input-dependent routing (fc2 starts at 0)
            router.fc2.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    wide = dict(proc(images=[Image.new("RGB", (48, 16), (200, 30, 90))], return_tensors="pt"))
    pad = wide["pixel_attention_mask"][0] == 0
    assert 0 < int(pad.sum()) < 16
    noisy, moved = dict(wide), dict(wide)
    noisy["pixel_values"] = wide["pixel_values"].clone()
    noisy["pixel_values"][0, pad] = torch.randn(int(pad.sum()), wide["pixel_values"].shape[-1])
    moved["pixel_values"] = wide["pixel_values"].clone()
    moved["pixel_values"][0, ~pad] += 1.0
    with torch.no_grad():
        ref = wemoe.predict("digits", wide)
        torch.testing.assert_close(wemoe.predict("digits", noisy), ref, atol=1e-5, rtol=1e-5)
        assert (wemoe.predict("digits", moved) - ref).abs().max() > 1e-3


def test_clip_input_errors_name_the_problem(clip_zoo):
    from adamerge.methods import TaskArithmetic

    with pytest.raises(MergeInputError, match=r"missing for \['shapes'\]"):
        TaskArithmetic(
            clip_zoo["base"], clip_zoo["models"], task_type="clip", heads={"digits": {"classnames": CLASSES["digits"]}}
        )
    with pytest.raises(MergeInputError, match="must be the full CLIPModel"):
        TaskArithmetic(clip_zoo["models"]["digits"], clip_zoo["models"], task_type="clip", heads=_heads())
    with pytest.raises(MergeInputError, match="exactly one"):
        TaskArithmetic(clip_zoo["base"], clip_zoo["models"], task_type="clip", heads=_heads(["no slot"]))
    with pytest.raises(MergeInputError, match="apply to task_type clip"):
        TaskArithmetic(clip_zoo["base"], clip_zoo["models"], task_type="image_cls", heads=_heads())


@pytest.fixture(scope="module")
def vit_zoo(tmp_path_factory):
    """A tiny random ViT image classifier base and two fine-tunes with their own heads (3 and 4 classes)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    base = ViTForImageClassification(cfg).eval()
    base.save_pretrained(str(root / "base"))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(root / "base"))
    models, data = {}, {}
    for i, (task, names) in enumerate(CLASSES.items()):
        c = ViTConfig.from_dict(
            {
                **cfg.to_dict(),
                "num_labels": len(names),
                "id2label": dict(enumerate(names)),
                "label2id": {n: j for j, n in enumerate(names)},
            }
        )
        ft = ViTForImageClassification(c)
        ft.vit.load_state_dict(base.vit.state_dict())
        perturb(ft.vit, 0.05, seed=i + 1)
        ft.save_pretrained(str(root / task))
        models[task] = str(root / task)
        data[task] = _image_data(root, task, seed=i)
    return {"base": str(root / "base"), "models": models, "data": data}


def test_image_classifier_fit_export_and_stock_task_models(vit_zoo, tmp_path):
    """AutoModelForImageClassification: one-hot coefficients reproduce each fine-tune's own logits; after 3 steps of
    AdaMerging on unlabeled images the export's tasks/<task>/ loads with stock AutoModelForImageClassification and
    equals the wrapper; evaluate scores the export on labelled images."""
    from transformers import AutoModelForImageClassification

    from adamerge import load_task_model
    from adamerge.evaluate import evaluate_checkpoint
    from adamerge.io.datasets import TaskData
    from adamerge.methods import AdaMerging
    from adamerge.training.datamodule import UnlabeledDataModule
    from tests.conftest import quick_fit

    module = AdaMerging(
        vit_zoo["base"], vit_zoo["models"], granularity="layer", init=0.3, lr=0.05, task_type="image_cls"
    )
    x = _pixels(vit_zoo["base"], seed=3)
    for task in CLASSES:  # the expert = base + its task vector with its own head = the fine-tune itself
        ft = AutoModelForImageClassification.from_pretrained(vit_zoo["models"][task]).eval()
        params = module.merged.merged_params(module.merged.one_hot(task))
        with torch.no_grad():
            torch.testing.assert_close(
                module.predict(task, {"pixel_values": x}, params), ft(pixel_values=x).logits, atol=1e-5, rtol=1e-5
            )
    dm = UnlabeledDataModule(
        {t: TaskData(path=p, image_column="image") for t, p in vit_zoo["data"].items()},
        tokenizer=vit_zoo["base"],
        samples_per_task=4,
        holdout=4,
    )
    quick_fit(module, dm, steps=3)
    out = module.export(tmp_path / "merged")
    module.eval()
    for task, names in CLASSES.items():
        stock = AutoModelForImageClassification.from_pretrained(str(out / "tasks" / task)).eval()
        rebuilt = load_task_model(out, task)
        with torch.no_grad():
            ref = module.predict(task, {"pixel_values": x})
            torch.testing.assert_close(stock(pixel_values=x).logits, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rebuilt(pixel_values=x).logits, ref, atol=1e-5, rtol=1e-5)
        assert stock.config.id2label[1] == names[1]
    scores = evaluate_checkpoint(
        str(out), {t: {"path": p, "image_column": "image", "label_column": "label"} for t, p in vit_zoo["data"].items()}
    )
    for task in CLASSES:  # recomputed by hand from the wrapper's predictions
        import datasets

        ds = datasets.load_from_disk(vit_zoo["data"][task])
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(vit_zoo["base"])
        px = proc(images=[im.convert("RGB") for im in ds["image"]], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            pred = module.predict(task, {"pixel_values": px}).argmax(-1)
        acc = float((pred == torch.tensor(ds["label"])).float().mean())
        assert scores[task]["n"] == len(ds) and abs(scores[task]["accuracy"] - acc) < 1e-6


def test_image_steps_shard_across_ranks_like_text(vit_zoo):
    """Under data parallelism each of 2 ranks takes half of every task's rows of a step: together they are the
    single-process batch, image for image."""
    from transformers import AutoImageProcessor

    from adamerge.io.datasets import ImageInputs, LazyImages, TaskData, load_texts
    from adamerge.training.datamodule import TaskStepDataset

    proc = ImageInputs(AutoImageProcessor.from_pretrained(vit_zoo["base"]))
    rows = {
        t: proc.encode(load_texts(TaskData(path=p, image_column="image"), t), TaskData(path=p, image_column="image"))
        for t, p in vit_zoo["data"].items()
    }
    assert all(isinstance(r, LazyImages) for r in rows.values())
    one = TaskStepDataset(rows, 4, 0, proc, 10)[7]
    ranks = [TaskStepDataset(rows, 4, 0, proc, 10, rank=r, world_size=2)[7] for r in range(2)]
    assert one["sizes"] == [4, 4] and all(b["sizes"] == [2, 2] for b in ranks)
    px = [b["inputs"]["pixel_values"] for b in ranks]
    for t in range(2):  # task t's rows: rank 0's half, then rank 1's half
        joined = torch.cat([px[0][2 * t : 2 * t + 2], px[1][2 * t : 2 * t + 2]])
        torch.testing.assert_close(joined, one["inputs"]["pixel_values"][4 * t : 4 * t + 4])
    # BatchNorm re-estimation and M3's scoring read whole steps (first_steps): every rank the single-process batch
    from adamerge.training.datamodule import UnlabeledDataModule

    dm = UnlabeledDataModule(
        {t: TaskData(path=p, image_column="image") for t, p in vit_zoo["data"].items()},
        tokenizer=vit_zoo["base"],
        samples_per_task=4,
    )
    dm.setup("fit")
    single = dm.first_steps(2)
    d = dm.dataset
    dm.dataset = TaskStepDataset(d.rows, 4, d.seed, d.collate, len(d), rank=1, world_size=2)  # as rank 1 of 2
    assert dm.dataset[0]["sizes"] == [2, 2]
    for a, b in zip(single, dm.first_steps(2)):
        assert b["sizes"] == [4, 4]
        torch.testing.assert_close(a["inputs"]["pixel_values"], b["inputs"]["pixel_values"])


def test_mixed_text_and_image_tasks_are_refused(vit_zoo):
    from adamerge.io.datasets import TaskData, input_builder

    with pytest.raises(MergeInputError, match="cannot be mixed"):
        input_builder({"a": TaskData(path="x", image_column="image"), "b": TaskData(path="y")}, vit_zoo["base"], 32)


# Tiny random configs of image families beyond ViT and MobileNetV2 (which have their own tests): BatchNorm CNNs with
# a Sequential head (ResNet) and dropout (EfficientNet), a LayerNorm CNN (ConvNeXt), windowed attention (Swin),
# layer scale (BEiT), convolutions with transformer blocks (MobileViT), a head over CLS and mean patch tokens (DINOv2).
IMAGE_FAMILIES = {
    "resnet": ("ResNetConfig", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")),
    "convnext": ("ConvNextConfig", dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)),
    "swin": (
        "SwinConfig",
        dict(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4),
    ),
    "efficientnet": (
        "EfficientNetConfig",
        dict(image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128),
    ),
    "beit": (
        "BeitConfig",
        dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            use_relative_position_bias=True,
            layer_scale_init_value=0.1,
        ),
    ),
    "mobilevit": (
        "MobileViTConfig",
        dict(image_size=32, hidden_sizes=[16, 20, 24], neck_hidden_sizes=[8, 8, 12, 12, 16, 16, 32]),
    ),
    "dinov2": (
        "Dinov2Config",
        dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
    ),
    "regnet": ("RegNetConfig", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8)),
    "bit": (
        "BitConfig",
        dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="preactivation", num_groups=2),
    ),
    "mobilenet_v1": ("MobileNetV1Config", dict(image_size=32, depth_multiplier=0.25)),
    "convnextv2": ("ConvNextV2Config", dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)),
    "swinv2": (
        "Swinv2Config",
        dict(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4),
    ),
    "focalnet": ("FocalNetConfig", dict(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1])),
    "poolformer": (
        "PoolFormerConfig",
        dict(
            hidden_sizes=[8, 16],
            depths=[1, 1],
            num_encoder_blocks=2,
            patch_sizes=[7, 3],
            strides=[4, 2],
            padding=[2, 1],
            pool_size=3,
        ),
    ),
    "segformer": (
        "SegformerConfig",
        dict(
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[8, 16],
            patch_sizes=[7, 3],
            strides=[4, 2],
            num_attention_heads=[1, 2],
            mlp_ratios=[2, 2],
        ),
    ),
    "pvt_v2": (
        "PvtV2Config",
        dict(
            image_size=32,
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[8, 16],
            patch_sizes=[7, 3],
            strides=[4, 2],
            num_attention_heads=[1, 2],
            mlp_ratios=[2, 2],
        ),
    ),
    "hiera": (
        "HieraConfig",
        dict(
            image_size=[32, 32],
            embed_dim=8,
            num_heads=[1, 2],
            depths=[1, 1],
            query_stride=[2, 2],
            num_query_pool=1,
            masked_unit_attention=[True, False],
        ),
    ),
    # its backbone class leaves the pooler out by default (add_pooling_layer=False); the classifier has one
    "data2vec_vision": (
        "Data2VecVisionConfig",
        dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
    ),
    # the Auto class maps LeViT to two classifiers: a fine-tune records which one it is
    "levit": (
        "LevitConfig",
        dict(
            image_size=32, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8]
        ),
        "LevitForImageClassification",
    ),
    # distilled DeiT: two heads (class and distillation token), not the Auto class's default DeiT classifier
    "deit_with_teacher": (
        "DeiTConfig",
        dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        "DeiTForImageClassificationWithTeacher",
    ),
}


def _family_zoo(family, root):
    """A tiny random base of ``family`` (IMAGE_FAMILIES) saved with a 32×32 image processor, one perturbed fine-tune
    per task of CLASSES with its own labels, and their image data: (base model, {task: path}, {task: data path})."""
    import transformers
    from transformers import ViTImageProcessor

    config_name, kwargs, *model_class = IMAGE_FAMILIES[family]

    def model(names):
        cfg = getattr(transformers, config_name)(
            **kwargs,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: j for j, n in enumerate(names)},
        )
        if model_class:
            return getattr(transformers, model_class[0])(cfg)
        return transformers.AutoModelForImageClassification.from_config(cfg)

    torch.manual_seed(0)
    base = model(["a", "b"]).eval()
    prefix = base.base_model_prefix
    base.save_pretrained(str(root / "base"))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(root / "base"))
    models, data = {}, {}
    for i, (task, names) in enumerate(CLASSES.items()):
        ft = model(names)
        getattr(ft, prefix).load_state_dict(getattr(base, prefix).state_dict())
        perturb(getattr(ft, prefix), 0.02, seed=i + 1)
        ft.save_pretrained(str(root / task))
        models[task] = str(root / task)
        data[task] = _image_data(root, task, n=16, seed=i)
    return base, models, data


@pytest.mark.parametrize("family", sorted(IMAGE_FAMILIES))
def test_image_families_merge_export_and_load_with_stock_transformers(family, tmp_path):
    """``image_cls`` on each family of IMAGE_FAMILIES: the one-hot merge is each fine-tune (its stock logits); after 2
    AdaMerging steps the export's ``tasks/<task>/`` loads with stock ``AutoModelForImageClassification``, its backbone
    parameters equal θ0 + Σ_t λ_t,p τ_t,p computed here from stock-loaded checkpoints and the manifest's
    coefficients, its head is the fine-tune's own, its class the fine-tune's, and its logits (as ``load_task_model``'s
    and ``load_merged``'s) equal the wrapper's, with the task's labels both ways."""
    from transformers import AutoModelForImageClassification

    from adamerge import load_merged, load_task_model
    from adamerge.io.datasets import TaskData
    from adamerge.methods import AdaMerging
    from adamerge.training.datamodule import UnlabeledDataModule
    from tests.conftest import quick_fit

    base, models, data = _family_zoo(family, tmp_path)
    prefix = base.base_model_prefix
    module = AdaMerging(str(tmp_path / "base"), models, granularity="layer", init=0.3, lr=0.05, task_type="image_cls")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    for task in CLASSES:
        ft = AutoModelForImageClassification.from_pretrained(models[task]).eval()
        with torch.no_grad():
            torch.testing.assert_close(
                module.predict(task, {"pixel_values": x}, module.merged.merged_params(module.merged.one_hot(task))),
                ft(pixel_values=x).logits,
                atol=1e-5,
                rtol=1e-5,
            )
    dm = UnlabeledDataModule(
        {t: TaskData(path=p, image_column="image") for t, p in data.items()},
        tokenizer=str(tmp_path / "base"),
        samples_per_task=4,
        holdout=4,
    )
    quick_fit(module, dm, steps=2)
    out = module.export(tmp_path / "merged")
    module.eval()

    coef = json.loads((out / "merge_manifest.json").read_text())["coefficients"]
    lam = torch.tensor(coef["effective"], dtype=torch.float64)
    assert coef["tasks"] == list(CLASSES) and lam.shape == (len(CLASSES), len(coef["params"]))
    assert sorted(coef["params"]) == sorted(
        n[len(prefix) + 1 :] for n, _ in base.named_parameters() if n.startswith(prefix + ".")
    )  # every backbone parameter merged
    assert (lam - 0.3).abs().max() > 1e-4  # the steps moved the coefficients: the hand merge below is not θ0+0.3Στ

    # module names, as stock transformers loads each checkpoint (BEiT's on-disk keys are converted on load)
    def weights(path):
        return AutoModelForImageClassification.from_pretrained(str(path)).state_dict()

    theta0 = weights(tmp_path / "base")
    fts = {t: weights(models[t]) for t in CLASSES}
    for task in CLASSES:
        exported = weights(out / "tasks" / task)
        for j, name in enumerate(coef["params"]):
            key = f"{prefix}.{name}"
            ref = theta0[key].double() + sum(
                lam[i, j] * (fts[t][key].double() - theta0[key].double()) for i, t in enumerate(CLASSES)
            )
            torch.testing.assert_close(exported[key].double(), ref, atol=1e-6, rtol=1e-6)
        heads = [k for k in fts[task] if not k.startswith(prefix + ".")]
        assert heads and all(torch.equal(exported[k], fts[task][k]) for k in heads)
        stock = AutoModelForImageClassification.from_pretrained(str(out / "tasks" / task)).eval()
        rebuilt = load_task_model(out, task)  # from the root weights and heads.safetensors
        with torch.no_grad():
            wrapper = module.predict(task, {"pixel_values": x})
            torch.testing.assert_close(load_merged(out).predict(task, pixel_values=x), wrapper, atol=1e-5, rtol=1e-5)
        for served in (stock, rebuilt):
            assert type(served) is type(base)  # the fine-tunes' class (DeiT's …WithTeacher is not Auto's default)
            with torch.no_grad():
                torch.testing.assert_close(served(pixel_values=x).logits, wrapper, atol=1e-5, rtol=1e-5)
            assert served.config.id2label == dict(enumerate(CLASSES[task]))
            assert served.config.label2id == {n: j for j, n in enumerate(CLASSES[task])}


@pytest.mark.parametrize("family, modules", [("swin", None), ("convnext", [r"\.pwconv[12]$"])])
def test_wemoe_on_hierarchical_image_models(family, modules, tmp_path):
    """WEMoE on models whose stages differ in width (Swin: token MLPs, the default modules; ConvNeXt: pointwise
    layers on channels-last [B, H, W, C] maps, named by ``modules``). At initialisation it is Task Arithmetic: the
    logits of the stock fine-tune with θ0 + 0.3 Σ_t τ_t loaded in by hand. After 2 steps ``load_merged`` rebuilds
    each router at its own width and serves the export as the wrapper computes it, each head with its own labels
    both ways (id2label and label2id)."""
    from transformers import AutoModelForImageClassification

    from adamerge import load_merged
    from adamerge.io.datasets import TaskData
    from adamerge.methods import WEMoE
    from adamerge.training.datamodule import UnlabeledDataModule
    from tests.conftest import quick_fit

    base, models, data = _family_zoo(family, tmp_path)
    prefix = base.base_model_prefix
    module = WEMoE(
        str(tmp_path / "base"), models, lr=0.05, task_type="image_cls", **({"modules": modules} if modules else {})
    )
    assert sorted({r.fc1.out_features for r in module.routing.routers.values()}) == [8, 16]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    theta0 = dict(base.named_parameters())
    fts = {t: dict(AutoModelForImageClassification.from_pretrained(p).named_parameters()) for t, p in models.items()}
    module.eval()
    for task in CLASSES:
        ref = AutoModelForImageClassification.from_pretrained(models[task]).eval()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if n.startswith(prefix + "."):
                    p.copy_(theta0[n] + sum(0.3 * (fts[t][n] - theta0[n]) for t in CLASSES))
            torch.testing.assert_close(
                module.predict(task, {"pixel_values": x}), ref(pixel_values=x).logits, atol=1e-5, rtol=1e-5
            )
    dm = UnlabeledDataModule(
        {t: TaskData(path=p, image_column="image") for t, p in data.items()},
        tokenizer=str(tmp_path / "base"),
        samples_per_task=4,
    )
    quick_fit(module, dm, steps=2)
    out = module.export(tmp_path / "merged")
    module.eval()
    served = load_merged(out)
    for task, names in CLASSES.items():
        with torch.no_grad():
            torch.testing.assert_close(
                served.predict(task, pixel_values=x), module.predict(task, {"pixel_values": x}), atol=1e-5, rtol=1e-5
            )
        config = served.heads[task].config
        assert config.id2label == dict(enumerate(names)) and config.label2id == {n: j for j, n in enumerate(names)}


def test_surgery_corrects_a_resnets_channels_and_serves_its_export(tmp_path):
    """ResNet's config has no ``image_size`` and its pooled feature is ``[n, C, 1, 1]``: Surgery's adapters are C wide
    and correct along the channels. After 3 steps, ``load_merged`` serves the export as computed here by hand: the
    stock merged backbone's pooled feature z, z − U ReLU(D z) over the channels with the saved adapter, then the
    fine-tune's own classifier."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForImageClassification

    from adamerge import load_merged
    from adamerge.methods import AdaMerging, Surgery
    from tests.conftest import quick_fit

    _, models, data = _family_zoo("resnet", tmp_path)  # its last stage is 16 channels wide
    # the merge under Surgery: 2 AdaMerging steps, BatchNorm statistics re-estimated at export
    dm, merged = _fit_and_export(
        AdaMerging(str(tmp_path / "base"), models, granularity="layer", init=0.3, lr=0.05, task_type="image_cls"),
        data,
        tmp_path,
    )
    surgery = Surgery(str(tmp_path / "base"), models, merged=str(merged), rank=4, lr=0.05, task_type="image_cls")
    assert all(a.down.weight.shape == (4, 16) and a.up.weight.shape == (16, 4) for a in surgery.adapters.values())
    quick_fit(surgery, dm, steps=3)
    out = surgery.export(tmp_path / "surgery")
    adapters = load_file(str(out / "surgery_adapters.safetensors"))
    backbone = AutoModel.from_pretrained(str(out)).eval()
    served = load_merged(out)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for task in CLASSES:
        down, up = adapters[f"{task}/down.weight"], adapters[f"{task}/up.weight"]
        assert up.abs().max() > 0  # trained away from its zero init: the correction below is not the identity
        head = AutoModelForImageClassification.from_pretrained(models[task]).classifier[1]
        with torch.no_grad():
            z = backbone(pixel_values=x).pooler_output.flatten(1)  # [n, 16]
            ref = head(z - torch.relu(z @ down.T) @ up.T)
            torch.testing.assert_close(served.predict(task, pixel_values=x), ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(surgery.eval().predict(task, {"pixel_values": x}), ref, atol=1e-5, rtol=1e-5)


def _mobilenet_zoo(root):
    """A tiny random MobileNetV2 (BatchNorm backbone) base, two perturbed fine-tunes and their image data."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification, MobileNetV2ImageProcessor

    torch.manual_seed(0)
    cfg = MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=3)
    base = MobileNetV2ForImageClassification(cfg).eval()
    base.save_pretrained(str(root / "base"))
    MobileNetV2ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(root / "base")
    )
    models, data = {}, {}
    for i, (task, names) in enumerate(CLASSES.items()):
        ft = MobileNetV2ForImageClassification(
            MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=len(names))
        )
        ft.mobilenet_v2.load_state_dict(base.mobilenet_v2.state_dict())
        perturb(ft.mobilenet_v2, 0.05, seed=i + 1)
        with torch.no_grad():  # each fine-tune's own running statistics, as after fine-tuning in train mode
            for m in ft.mobilenet_v2.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.add_(0.1 * (i + 1))
                    m.running_var.mul_(1.0 + 0.2 * (i + 1))
        ft.save_pretrained(str(root / task))
        models[task], data[task] = str(root / task), _image_data(root, task, seed=i)
    return base, models, data


def _fit_and_export(module, data, tmp_path, steps=2, bn_batches=3):
    """Two training steps of ``module`` on ``data`` (4 rows per task per step), exported to ``tmp_path/merged`` with
    BatchNorm statistics re-estimated on ``bn_batches`` steps; returns (data module, export path)."""
    import pytorch_lightning as pl

    from adamerge.io.datasets import TaskData
    from adamerge.training.callbacks import ExportOnFitEnd
    from adamerge.training.datamodule import UnlabeledDataModule

    dm = UnlabeledDataModule(
        {t: TaskData(path=p, image_column="image") for t, p in data.items()},
        tokenizer=str(tmp_path / "base"),
        samples_per_task=4,
    )
    out = tmp_path / "merged"
    pl.seed_everything(0, verbose=False)
    pl.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[ExportOnFitEnd(output_dir=str(out), bn_batches=bn_batches)],
    ).fit(module, datamodule=dm)
    return dm, out


def test_batchnorm_statistics_are_reestimated_under_the_merge(tmp_path):
    """A MobileNetV2 merge (BatchNorm backbone): at the end of fit the export's running statistics are re-estimated
    on the first bn_batches steps. Reference, for the first BatchNorm (whose input no other BatchNorm affects): the
    per-batch mean and unbiased variance of its input in the stock exported model, averaged over the batches."""
    from transformers import AutoModelForImageClassification

    from adamerge import read_manifest
    from adamerge.methods import AdaMerging

    base, models, data = _mobilenet_zoo(tmp_path)
    module = AdaMerging(str(tmp_path / "base"), models, granularity="layer", init=0.3, lr=0.05, task_type="image_cls")
    dm, out = _fit_and_export(module, data, tmp_path)
    info = read_manifest(out)["batchnorm"]
    assert info["batches"] == 3 and info["rows"] == 3 * 4 * len(CLASSES)
    stock = AutoModelForImageClassification.from_pretrained(str(out / "tasks" / "digits")).eval()
    bn = stock.mobilenet_v2.conv_stem.first_conv.normalization
    mean, var = _cumulative_stats(
        _first_bn_inputs(stock.mobilenet_v2, [dm.dataset[i]["inputs"]["pixel_values"] for i in range(3)])
    )
    torch.testing.assert_close(bn.running_mean, mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bn.running_var, var, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(bn.running_var, base.mobilenet_v2.conv_stem.first_conv.normalization.running_var)
    x = dm.dataset[5]["inputs"]
    module.eval()
    with torch.no_grad():  # the wrapper serves the re-estimated statistics too
        torch.testing.assert_close(stock(**x).logits, module.predict("digits", x), atol=1e-5, rtol=1e-4)


def test_batch_statistics_summed_over_ranks_normalise_and_leave_the_layers_as_they_were():
    """``batch_statistics(total=...)`` (what a training step under data parallelism uses): every BatchNorm layer
    normalises with statistics that go through ``total`` — two sums in the forward, one in the backward — equal here
    (one process: ``total`` is the identity) to the batch's own mean and biased variance by hand; afterwards each
    layer is in eval mode with its running statistics, its own forward and unchanged buffers."""
    from adamerge.core.batchnorm import batch_statistics

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.fill_(1.0), bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), bn)
    x = torch.randn(5, 2, 4, 4)
    calls = []

    def total(t):
        calls.append(tuple(t.shape))
        return t

    with batch_statistics(net, total=total):
        y = net(x)
        assert calls == [(4,), (3,)]  # per channel: sums + row count, then the squared deviations
    y.square().sum().backward()
    assert calls[2:] == [(6,)]  # Σ dy and Σ dy·x̂ per channel
    h = net[0](x).detach()
    mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)
    shape = (1, -1, 1, 1)
    ref = (h - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert "forward" not in bn.__dict__ and not bn.training and bn.track_running_stats
    assert torch.equal(bn.running_mean, torch.ones(3)) and torch.equal(bn.running_var, torch.ones(3))
    with torch.no_grad():  # eval again: the running statistics
        torch.testing.assert_close(
            net(x), (h - 1.0) / torch.sqrt(torch.tensor(1.0 + bn.eps)) * bn.weight.view(shape) + bn.bias.view(shape)
        )


@pytest.mark.parametrize("statistics", ["batch", "running"])
def test_training_steps_normalise_the_merge_with_batch_statistics(tmp_path, statistics):
    """In a training step the merge's forward normalises every BatchNorm layer with the step's batch statistics
    (``batch``, the default: what the export will do with statistics re-estimated on such rows) or with the
    base's running statistics (``running``); the experts (KL teachers here) always run with their own fine-tune's
    running statistics, and no buffer changes. Reference: the first BatchNorm's output recomputed by hand from its
    input, its affine weights and the statistics each case should use."""
    import pytorch_lightning as pl
    from safetensors.torch import load_file

    from adamerge.io.datasets import TaskData
    from adamerge.methods import AdaMerging
    from adamerge.training.datamodule import UnlabeledDataModule

    base, models, data = _mobilenet_zoo(tmp_path)
    module = AdaMerging(
        str(tmp_path / "base"),
        models,
        granularity="layer",
        init=0.3,
        lr=0.05,
        task_type="image_cls",
        objective="kl",
        task_chunks=1 if statistics == "running" else "auto",
        batchnorm_statistics=statistics,
    )
    assert module.task_chunk_count() == 1  # "auto" on a BatchNorm backbone on batch statistics: the whole step
    bn = module.merged.backbone.conv_stem.first_conv.normalization
    before = {n: b.clone() for n, b in module.merged.backbone.named_buffers()}
    calls = []
    handle = bn.register_forward_hook(
        lambda m, args, out: calls.append(
            (
                args[0].detach(),
                out.detach(),
                m.weight.detach(),
                m.bias.detach(),
                m.running_mean.clone(),
                m.running_var.clone(),
            )
        )
    )
    dm = UnlabeledDataModule(
        {t: TaskData(path=p, image_column="image") for t, p in data.items()},
        tokenizer=str(tmp_path / "base"),
        samples_per_task=4,
    )
    pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    ).fit(module, datamodule=dm)
    handle.remove()
    eps, rows = bn.eps, 4 * len(CLASSES)
    merged = [c for c in calls if c[0].shape[0] == rows]
    experts = [c for c in calls if c[0].shape[0] == 4]
    assert len(merged) == 2 and len(experts) == 2 * len(CLASSES)
    shape = (1, -1, 1, 1)
    for x, y, w, b, mean, var in merged:
        if statistics == "batch":
            mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        else:
            torch.testing.assert_close(mean, before["conv_stem.first_conv.normalization.running_mean"])
        ref = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * w.view(shape) + b.view(shape)
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    for k, (x, y, w, b, mean, var) in enumerate(experts):  # step-major, tasks in order: each its own fine-tune's
        task = list(CLASSES)[k % len(CLASSES)]
        sd = load_file(str(tmp_path / task / "model.safetensors"))
        own = sd["mobilenet_v2.conv_stem.first_conv.normalization.running_mean"]
        torch.testing.assert_close(mean, own)
        ref = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * w.view(shape) + b.view(shape)
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    after = dict(module.merged.backbone.named_buffers())
    assert all(torch.equal(before[n], after[n]) for n in before)  # nothing tracked into the shared buffers
    assert all(
        m.track_running_stats and not m.training
        for m in module.merged.backbone.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    )
    # label-free selection scores the merge as exported: statistics re-estimated on the scored rows. Reference:
    # agreement with the stock fine-tunes, the merge's statistics re-estimated on the same rows first.
    from transformers import AutoModelForImageClassification

    batches = dm.first_steps(2)
    score = module.selection_score(batches, "agreement")
    assert all(torch.equal(before[n], b) for n, b in module.merged.backbone.named_buffers())
    module.recalibrate_batchnorm(batches)
    stock = {t: AutoModelForImageClassification.from_pretrained(models[t]).eval() for t in CLASSES}
    same = {t: [] for t in CLASSES}
    with torch.no_grad():
        for b in batches:
            start = 0
            for task, n in zip(b["tasks"], b["sizes"]):
                x = b["inputs"]["pixel_values"][start : start + n]
                same[task].append(
                    module.predict(task, {"pixel_values": x}).argmax(-1)
                    == stock[task](pixel_values=x).logits.argmax(-1)
                )
                start += n
    assert score == pytest.approx(sum(float(torch.cat(v).float().mean()) for v in same.values()) / len(same))


def _first_bn_inputs(backbone, batches):
    """The inputs of a MobileNetV2 ``backbone``'s first BatchNorm (whose input no BatchNorm affects) on each of
    ``batches``."""
    bn = backbone.conv_stem.first_conv.normalization
    seen = []
    handle = bn.register_forward_hook(lambda m, args, output: seen.append(args[0].detach()))
    with torch.no_grad():
        for x in batches:
            backbone(pixel_values=x)
    handle.remove()
    return seen


def _cumulative_stats(seen):
    """Running mean and variance as ``momentum=None`` accumulates them: the mean over batches of each batch's mean
    and unbiased variance."""
    mean = torch.stack([a.mean(dim=(0, 2, 3)) for a in seen]).mean(0)
    var = torch.stack([a.transpose(0, 1).reshape(a.shape[1], -1).var(dim=1, unbiased=True) for a in seen]).mean(0)
    return mean, var


def test_per_task_batchnorm_statistics_train_export_and_serve(tmp_path):
    """``batchnorm_statistics: task``: in a training step each task's rows are normalised with their own batch
    statistics; at export each task gets running statistics re-estimated on its rows alone, served by the
    wrapper, written into ``tasks/<task>/`` (stock transformers), ``task_buffers.safetensors`` (load_merged,
    load_task_model) and carried by a Surgery started from that export; the root keeps statistics of all rows.
    References: the first BatchNorm's output recomputed by hand from its input; running statistics as the mean of
    per-batch statistics of the first BatchNorm's input in the stock exported model, on the rows they should see."""
    from transformers import AutoModel, AutoModelForImageClassification

    from adamerge import load_merged, read_manifest
    from adamerge.methods import AdaMerging, Surgery
    from adamerge.serving import load_task_model

    base, models, data = _mobilenet_zoo(tmp_path)
    # task_chunks 1 (the GPU default): the whole step under one forward call, which must group the rows by task
    module = AdaMerging(
        str(tmp_path / "base"),
        models,
        granularity="layer",
        init=0.3,
        lr=0.05,
        task_type="image_cls",
        task_chunks=1,
        batchnorm_statistics="task",
    )
    bn = module.merged.backbone.conv_stem.first_conv.normalization
    calls = []
    handle = bn.register_forward_hook(
        lambda m, args, out: calls.append((args[0].detach(), out.detach(), m.weight.detach(), m.bias.detach()))
    )
    dm, out = _fit_and_export(module, data, tmp_path)
    handle.remove()
    training = calls[: 2 * len(CLASSES)]  # then the re-estimation's forwards
    assert [c[0].shape[0] for c in training] == [4] * (2 * len(CLASSES))  # one task's rows per forward
    shape = (1, -1, 1, 1)
    for x, y, w, b in training:
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        ref = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * w.view(shape) + b.view(shape)
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)

    manifest = read_manifest(out)
    assert manifest["batchnorm"]["per_task"] is True and manifest["task_buffers"]["tasks"] == sorted(CLASSES)
    assert "task_buffers.safetensors" in (out / "README.md").read_text()  # the model card says where they are
    steps = dm.first_steps(3)
    name = "conv_stem.first_conv.normalization"
    root = AutoModel.from_pretrained(str(out)).eval()
    rows = {t: [] for t in CLASSES}
    for st in steps:
        start = 0
        for t, n in zip(st["tasks"], st["sizes"]):
            rows[t].append(st["inputs"]["pixel_values"][start : start + n])
            start += n
    everything = [st["inputs"]["pixel_values"] for st in steps]
    wrapper = load_merged(out)
    for task in CLASSES:
        stock = AutoModelForImageClassification.from_pretrained(str(out / "tasks" / task)).eval()
        mean, var = _cumulative_stats(_first_bn_inputs(stock.mobilenet_v2, rows[task]))
        own = stock.mobilenet_v2.conv_stem.first_conv.normalization
        torch.testing.assert_close(own.running_mean, mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(own.running_var, var, atol=1e-5, rtol=1e-4)
        x = {"pixel_values": rows[task][0]}
        module.eval()
        with torch.no_grad():
            logits = stock(**x).logits
            torch.testing.assert_close(module.predict(task, x), logits, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(wrapper.predict(task, **x), logits, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(load_task_model(out, task)(**x).logits, logits, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(own.running_mean, root.get_submodule(name).running_mean)
    # the root: one set of statistics, re-estimated on every task's rows
    all_mean, all_var = _cumulative_stats(_first_bn_inputs(root, everything))
    torch.testing.assert_close(root.get_submodule(name).running_mean, all_mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(root.get_submodule(name).running_var, all_var, atol=1e-5, rtol=1e-4)

    # label-free selection scores the merge as exported: each task's statistics re-estimated on its scored rows.
    # Reference: agreement with the stock fine-tunes after re-estimating on the same rows
    batches = dm.first_steps(2)
    score = module.selection_score(batches, "agreement")
    module.recalibrate_batchnorm(batches)
    experts = {t: AutoModelForImageClassification.from_pretrained(models[t]).eval() for t in CLASSES}
    same = []
    with torch.no_grad():
        for task in CLASSES:
            x = torch.cat(
                [
                    b["inputs"]["pixel_values"][i * 4 : (i + 1) * 4]
                    for b in batches
                    for i, t in enumerate(b["tasks"])
                    if t == task
                ]
            )
            same.append(
                float(
                    (
                        module.predict(task, {"pixel_values": x}).argmax(-1)
                        == experts[task](pixel_values=x).logits.argmax(-1)
                    )
                    .float()
                    .mean()
                )
            )
    assert score == pytest.approx(sum(same) / len(same))

    # Surgery from this export serves each task with its own statistics (adapters are the identity at init)
    surgery = Surgery(str(tmp_path / "base"), models, merged=str(out), task_type="image_cls").eval()
    for task in CLASSES:
        x = {"pixel_values": rows[task][0]}
        with torch.no_grad():
            torch.testing.assert_close(surgery.predict(task, x), wrapper.predict(task, **x), atol=1e-5, rtol=1e-4)


def test_adamerge_merge_writes_per_task_batchnorm_statistics(tmp_path):
    """``adamerge merge --batchnorm_statistics task`` (a data-free merge with a data section): each tasks/<task>/
    holds its own statistics (those of task_buffers.safetensors), re-estimated on its rows alone — reference: the
    first BatchNorm's input in the stock per-task model on the same steps' rows of that task — and the root another
    set; without the option, no task_buffers file and every tasks/<task>/ holds the root's statistics."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForImageClassification

    from adamerge import read_manifest
    from adamerge.cli.app import merge_main
    from adamerge.io.datasets import TaskData
    from adamerge.training.datamodule import UnlabeledDataModule

    base, models, data = _mobilenet_zoo(tmp_path)
    name = "conv_stem.first_conv.normalization"
    for option in ("task", "batch"):
        out = tmp_path / f"merged-{option}"
        args = [
            "--model",
            "adamerge.methods.TaskArithmetic",
            "--model.base",
            str(tmp_path / "base"),
            "--model.models",
            json.dumps(models),
            "--model.task_type",
            "image_cls",
            "--output_dir",
            str(out),
            "--bn_batches",
            "2",
            "--model.batchnorm_statistics",
            option,
            "--data",
            json.dumps(
                {"tasks": {t: {"path": p, "image_column": "image"} for t, p in data.items()}, "samples_per_task": 4}
            ),
        ]
        merge_main(args)
        root = AutoModel.from_pretrained(str(out)).get_submodule(name)
        manifest = read_manifest(out)
        if option == "batch":
            assert "task_buffers" not in manifest and not (out / "task_buffers.safetensors").exists()
        dm = UnlabeledDataModule(
            {t: TaskData(path=p, image_column="image") for t, p in data.items()},
            tokenizer=str(tmp_path / "base"),
            samples_per_task=4,
        )
        steps = dm.first_steps(2)
        for i, task in enumerate(CLASSES):
            stock = AutoModelForImageClassification.from_pretrained(str(out / "tasks" / task)).eval()
            own = stock.mobilenet_v2.get_submodule(name)
            if option == "batch":
                torch.testing.assert_close(own.running_mean, root.running_mean)
                continue
            assert manifest["batchnorm"]["per_task"] is True
            stored = load_file(str(out / "task_buffers.safetensors"))[f"{task}/{name}.running_mean"]
            torch.testing.assert_close(own.running_mean, stored)
            rows = [st["inputs"]["pixel_values"][i * 4 : (i + 1) * 4] for st in steps]
            assert all(st["tasks"][i] == task for st in steps)
            mean, _ = _cumulative_stats(_first_bn_inputs(stock.mobilenet_v2, rows))
            torch.testing.assert_close(own.running_mean, mean, atol=1e-5, rtol=1e-4)
            assert not torch.allclose(own.running_mean, root.running_mean)


def test_m3_scores_batchnorm_candidates_with_batch_statistics(tmp_path):
    """M3's best-of-K choice on a BatchNorm backbone scores each candidate with every step normalised on its own
    statistics (the base's running ones do not describe a candidate). Reference: each candidate merged by hand from
    the stock checkpoints' parameters (θ0 + s Σ w_t τ_t), BatchNorm on batch statistics, each fine-tune's own head,
    the mean entropy of each task's rows summed over tasks and averaged over the steps."""
    import copy

    from transformers import MobileNetV2ForImageClassification

    from adamerge.io.datasets import TaskData
    from adamerge.methods import M3
    from adamerge.training.datamodule import UnlabeledDataModule

    base, models, data = _mobilenet_zoo(tmp_path)
    m3 = M3(str(tmp_path / "base"), models, candidates=3, eval_batches=2, task_type="image_cls")
    dm = UnlabeledDataModule(
        {t: TaskData(path=p, image_column="image") for t, p in data.items()},
        tokenizer=str(tmp_path / "base"),
        samples_per_task=4,
    )
    m3.use_data(dm)
    fts = {t: MobileNetV2ForImageClassification.from_pretrained(models[t]).eval() for t in CLASSES}
    theta0 = dict(base.mobilenet_v2.named_parameters())
    batches = dm.first_steps(2)
    expected = []
    for w in m3.draws:
        body = copy.deepcopy(base.mobilenet_v2)
        with torch.no_grad():
            for n, p in body.named_parameters():
                p.copy_(
                    theta0[n]
                    + sum(
                        float(w[i]) * (dict(fts[t].mobilenet_v2.named_parameters())[n] - theta0[n])
                        for i, t in enumerate(CLASSES)
                    )
                )
        for m in body.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.train()
                m.track_running_stats = False
        total = 0.0
        with torch.no_grad():
            for b in batches:
                pooled = body(pixel_values=b["inputs"]["pixel_values"]).pooler_output
                start = 0
                for task, n in zip(b["tasks"], b["sizes"]):
                    p = fts[task].classifier(pooled[start : start + n]).softmax(-1)
                    total += float(-(p * p.log()).sum(-1).mean())
                    start += n
        expected.append(total / len(batches))
    assert m3.scores == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert m3.chosen == int(np.argmin(expected))


def test_clip_paper_configs_name_the_same_tasks_everywhere():
    """Each CLIP ViT-B/32 config: the fine-tunes, the zero-shot heads and the data name the same 8 tasks, every head
    has a template set, and the published figure is stated."""
    from pathlib import Path

    import yaml

    from adamerge.kinds.clip import TEMPLATES

    paths = sorted((Path(__file__).parents[1] / "configs" / "papers").glob("clip_vit_b32_*.yaml"))
    assert len(paths) >= 10
    for p in paths:
        doc = yaml.safe_load(p.read_text())
        args = doc["model"]["init_args"]
        tasks = list(args["models"])
        assert len(tasks) == 8 and args["task_type"] == "clip", p.name
        assert list(args["heads"]) == tasks and all(t in TEMPLATES for t in tasks), p.name
        if "data" in doc:
            assert list(doc["data"]["tasks"]) == tasks, p.name
            assert all(s["image_column"] == "image" for s in doc["data"]["tasks"].values()), p.name
        assert "Published:" in p.read_text(), p.name


def _reference_mobilenet_v2(sd, x):
    """torchvision's MobileNetV2 forward written out with torch.nn.functional over its own state dict (eval mode):
    the independent reference for the conversion."""
    import torch.nn.functional as F

    def cbn(x, prefix_conv, prefix_bn, stride=1, groups=1, act=True):
        w = sd[prefix_conv + ".weight"]
        x = F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2, groups=groups)
        x = F.batch_norm(
            x,
            sd[prefix_bn + ".running_mean"],
            sd[prefix_bn + ".running_var"],
            sd[prefix_bn + ".weight"],
            sd[prefix_bn + ".bias"],
            training=False,
            eps=1e-5,
        )
        return F.relu6(x) if act else x

    x = cbn(x, "features.0.0", "features.0.1", stride=2)
    x = cbn(x, "features.1.conv.0.0", "features.1.conv.0.1", groups=x.shape[1])
    x = cbn(x, "features.1.conv.1", "features.1.conv.2", act=False)
    block = 2
    for _t, _c, n, s in [(6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            p = f"features.{block}.conv"
            y = cbn(x, p + ".0.0", p + ".0.1")
            y = cbn(y, p + ".1.0", p + ".1.1", stride=s if i == 0 else 1, groups=y.shape[1])
            y = cbn(y, p + ".2", p + ".3", act=False)
            x = x + y if (i > 0 or s == 1) and y.shape == x.shape else y
            block += 1
    x = cbn(x, "features.18.0", "features.18.1")
    return F.linear(x.mean(dim=(2, 3)), sd["classifier.1.weight"], sd["classifier.1.bias"])


def test_mobilenet_v2_conversion_matches_an_independent_forward():
    """The packaged torchvision ImageNet MobileNetV2, converted for transformers, gives the logits of a functional
    re-implementation of torchvision's architecture over the original state dict."""
    from pathlib import Path

    from transformers import MobileNetV2ForImageClassification

    from benchmarks.vision import convert_mobilenet_v2, mobilenet_config, torchvision_mobilenet_v2

    sd = torchvision_mobilenet_v2(Path(__file__).parents[1] / ".cache" / "wheels")
    model = MobileNetV2ForImageClassification(mobilenet_config()).eval()
    model.load_state_dict(convert_mobilenet_v2(sd), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, _reference_mobilenet_v2(sd, x), atol=1e-4, rtol=1e-4)


def test_clip_recompute_gives_the_plain_gradient(clip_zoo):
    """The CLIP vision tower's layers (encoder.layers.N) re-merged and re-run in the backward
    (``recompute: merge``) and re-run only (``activations``): the plain step's entropy gradient."""
    from adamerge.methods import AdaMerging

    x = _pixels(clip_zoo["base"], n=8, seed=3)
    batch = {"inputs": {"pixel_values": x}, "tasks": list(CLASSES), "sizes": [4, 4]}
    grads = []
    for recompute in (None, "activations", "merge"):
        module = AdaMerging(
            clip_zoo["base"], clip_zoo["models"], task_type="clip", heads=_heads(), task_chunks=1, recompute=recompute
        )
        if recompute:
            assert [p for _, p in module.merged.layer_stores] == [f"encoder.layers.{i}" for i in (0, 1)]
        module.objective(batch)[0].backward()
        grads.append(module.merged.coefficients.weight.grad.clone())
    assert grads[0].abs().max() > 1e-6
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], atol=1e-7, rtol=1e-5)


def test_wemoe_on_clip_starts_as_task_arithmetic(clip_zoo):
    """WEMoE routes the CLIP vision tower's MLPs (mlp.fc1/fc2); at initialisation its logits are Task
    Arithmetic's, and only the routers train."""
    from adamerge.methods import TaskArithmetic, WEMoE

    kw = dict(task_type="clip", heads=_heads())
    ta = TaskArithmetic(clip_zoo["base"], clip_zoo["models"], scale=0.3, **kw).eval()
    moe = WEMoE(clip_zoo["base"], clip_zoo["models"], scale=0.3, **kw).eval()
    assert len(moe.routing.routers) == 2  # two layers of the tiny tower
    trainable = {n for n, p in moe.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("routing.") for n in trainable)
    x = _pixels(clip_zoo["base"], seed=4)
    for task in CLASSES:
        with torch.no_grad():
            torch.testing.assert_close(
                moe.predict(task, {"pixel_values": x}), ta.predict(task, {"pixel_values": x}), atol=1e-5, rtol=1e-5
            )


def test_benchmark_unpickler_reads_arrays_and_refuses_anything_else():
    """The animal-mnist files are pickles: the benchmark's unpickler accepts numpy arrays and nothing else."""
    import io
    import pickle

    from benchmarks.vision import _ArrayUnpickler

    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(_ArrayUnpickler(io.BytesIO(pickle.dumps(arr))).load(), arr)

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        _ArrayUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()


def test_idx_reader_matches_a_handwritten_file():
    """Fashion-MNIST ships as IDX files: bytes written by hand (magic, big-endian sizes, uint8 payload) read back."""
    import struct

    from benchmarks.vision import read_idx

    images = bytes([0, 0, 8, 3]) + struct.pack(">III", 2, 2, 3) + bytes(range(12))
    out = read_idx(images)
    assert out.shape == (2, 2, 3) and out[1, 0, 2] == 8 and out.dtype == np.uint8
    labels = bytes([0, 0, 8, 1]) + struct.pack(">I", 3) + bytes([9, 0, 4])
    assert read_idx(labels).tolist() == [9, 0, 4]
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(bytes([0, 0, 13, 1]) + struct.pack(">I", 1) + bytes(4))  # float32 payload


def test_clip_ddp_two_processes_match_single_process(clip_zoo, tmp_path):
    """Image data under DDP: each of 2 processes takes half of every task's images of a step, the gradients are
    all-reduced, and the coefficients equal a single process's with the same global batch."""
    from tests.test_distributed import TOL, _fit

    def cfg(name, devices):
        return {
            "seed_everything": 0,
            "model": {
                "class_path": "adamerge.methods.AdaMerging",
                "init_args": {
                    "base": clip_zoo["base"],
                    "models": clip_zoo["models"],
                    "granularity": "layer",
                    "task_type": "clip",
                    "heads": _heads(),
                },
            },
            "data": {
                "tasks": {t: {"path": p, "image_column": "image"} for t, p in clip_zoo["data"].items()},
                "samples_per_task": 4,
            },
            "trainer": {
                "max_steps": 4,
                "accelerator": "cpu",
                "devices": devices,
                "logger": False,
                "default_root_dir": str(tmp_path / f"{name}_root"),
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "enable_checkpointing": False,
                **({"strategy": "ddp"} if devices > 1 else {}),
            },
            "export": {"output_dir": str(tmp_path / name)},
        }

    single = _fit(tmp_path, cfg("single", 1), "single")
    ddp = _fit(tmp_path, cfg("ddp", 2), "ddp")
    moved = (single - 0.3).abs()
    assert moved.max() > 2e-3
    # Coefficients whose gradients sit at Adam's eps (1e-8) barely move (here 2 tensors of the tiny random tower, by
    # ~1e-5) and their update follows the float noise of the all-reduce (see tests/test_distributed.py): they are held
    # to 1e-4; every coefficient that moved by more than 1e-3 (here 74 of 78) must equal the single process's to TOL,
    # which a wrong share of the images or an unreduced gradient would break.
    assert (single - ddp)[moved > 1e-3].abs().max() < TOL, (single - ddp).abs().max()
    assert (moved > 1e-3).float().mean() > 0.9 and (single - ddp).abs().max() < 1e-4


def test_image_data_from_an_imagefolder_and_parquet(tmp_path):
    """Image tasks read from an ``imagefolder`` directory (class folders of PNGs) and from a parquet file keep
    their pixels: the processed batch equals processing the source images directly."""
    import datasets
    from transformers import ViTImageProcessor

    from adamerge.io.datasets import ImageInputs, TaskData, load_texts

    images = image_rows(6, seed=11)
    folder = tmp_path / "folder"
    for i, im in enumerate(images):
        d = folder / ("cat" if i % 2 else "dog")
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i}.png")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    datasets.Dataset.from_dict({"image": images, "label": [0, 1] * 3}, features=feats).to_parquet(
        str(tmp_path / "d.parquet")
    )
    proc = ViTImageProcessor(size={"height": 32, "width": 32})
    inputs = ImageInputs(proc)
    for path in (folder, tmp_path / "d.parquet"):
        spec = TaskData(path=str(path), image_column="image")
        rows = inputs.encode(load_texts(spec, "t"), spec)
        assert len(rows) == 6
        got = inputs([rows[i] for i in range(6)])["pixel_values"]
        want = proc(images=[rows[i].convert("RGB") for i in range(6)], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(got, want)
        assert sorted(np.asarray(rows[i]).sum() for i in range(6)) == sorted(np.asarray(im).sum() for im in images)


@pytest.mark.parametrize("side", [32, 64])
def test_vision_base_resizes_to_the_presets_image_size(tmp_path, side):
    """``build_vision_base(image_size=...)`` (presets ``vision`` / ``vision64``) saves a config and an image processor
    at that side: a 28×28 grey image comes out as 3×side×side pixel values."""
    from pathlib import Path

    import numpy as np
    import PIL.Image
    from transformers import AutoConfig, AutoImageProcessor

    from benchmarks.run import PRESETS
    from benchmarks.vision import build_vision_base

    preset = {32: "vision", 64: "vision64"}[side]
    assert PRESETS[preset].image_size == side and PRESETS[preset].tasks == PRESETS["vision"].tasks
    base = build_vision_base(tmp_path, Path(__file__).parents[1] / ".cache" / "wheels", PRESETS[preset].image_size)
    assert AutoConfig.from_pretrained(str(base)).image_size == side
    image = PIL.Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).convert("RGB")
    pixels = AutoImageProcessor.from_pretrained(str(base))(images=[image], return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, side, side)


def test_adapt_batchnorm_gives_each_layer_the_tasks_own_statistics():
    """The `frozen-adabn` vision zoo protocol: after `adapt_batchnorm`, every BatchNorm's running mean
    and variance are the average over the batches of its training-mode input's per-batch mean and unbiased variance
    (read here from hooks on a copy, not from BatchNorm's own bookkeeping); momenta are restored, the model is left
    in eval mode and its weights untouched."""
    import copy

    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    from benchmarks.vision import adapt_batchnorm

    torch.manual_seed(0)
    model = MobileNetV2ForImageClassification(MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=3))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    pixels = torch.randn(12, 3, 32, 32) * 2 + 0.5
    reference, seen = copy.deepcopy(model).train(), {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: seen.setdefault(name, []).append(args[0]))
        for name, m in reference.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    with torch.no_grad():
        for i in range(0, 12, 4):
            reference.mobilenet_v2(pixel_values=pixels[i : i + 4])
    for h in hooks:
        h.remove()
    adapt_batchnorm(model, pixels, batch_size=4)
    assert not model.training
    norms = dict((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert len(norms) == len(seen) > 10
    for name, m in norms.items():
        x = seen[name]
        assert len(x) == 3
        mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in x]).mean(0)
        var = torch.stack([b.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for b in x]).mean(0)
        torch.testing.assert_close(m.running_mean, mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(m.running_var, var, atol=1e-5, rtol=1e-4)
        assert m.momentum == 0.1
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k


def test_lora_on_convolutions_merges_as_peft_does_and_grouped_ones_are_refused(tmp_path):
    """peft's LoRA on a Conv2d (A: a conv with the layer's kernel, B: a 1×1 conv) is the dense task vector
    ΔW[o, i, k…] = Σ_r B[o, r] A[r, i, k…]: the one-hot merge of ResNet adapters (every convolution targeted, a 7×7
    stem included) gives peft's merge_and_unload; LoRA on a depthwise convolution (ConvNeXt's dwconv, which peft
    cannot merge either) is refused naming the tensor."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    from adamerge.methods import TaskArithmetic

    def adapter(base, path, seed, **lora):
        torch.manual_seed(seed)
        model = transformers.AutoModelForImageClassification.from_pretrained(base)
        get_peft_model(
            model, LoraConfig(init_lora_weights=False, modules_to_save=["classifier"], **lora)
        ).save_pretrained(str(path))
        return str(path)

    _family_zoo("resnet", tmp_path / "resnet")
    base = str(tmp_path / "resnet" / "base")
    paths = {
        t: adapter(base, tmp_path / t, i, r=4, lora_alpha=8, target_modules=["convolution"])
        for i, t in enumerate(("a", "b"))
    }
    module = TaskArithmetic(base, paths, scale=1.0, task_type="image_cls").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = transformers.AutoModelForImageClassification.from_pretrained(base).eval()
    for task in paths:
        ref = (
            PeftModel.from_pretrained(transformers.AutoModelForImageClassification.from_pretrained(base), paths[task])
            .merge_and_unload()
            .eval()
        )
        with torch.no_grad():
            expected = ref(pixel_values=x).logits
            assert (expected - plain(pixel_values=x).logits).abs().max() > 1e-2  # the adapter changes the model
            got = module.predict(task, {"pixel_values": x}, module.merged.merged_params(module.merged.one_hot(task)))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    _family_zoo("convnext", tmp_path / "convnext")
    base = str(tmp_path / "convnext" / "base")
    grouped = adapter(base, tmp_path / "dw", 0, r=16, lora_alpha=16, target_modules=["dwconv"])
    with pytest.raises(
        MergeInputError,
        match=r"'encoder\.stages\.0\.layers\.0\.dwconv\.weight' give shape .* "
        r"\(a grouped convolution",
    ):
        TaskArithmetic(base, {"dw": grouped}, task_type="image_cls")
