"""A method added from outside the package — one class and one registration in this file — exports its own files,
records its own manifest entry, is served by ``adamerge.load_merged`` through its export extension and described by
the model card, with no file of the package touched (``adamerge.io.extensions``, ``adamerge.methods.register_method``).
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from adamerge import MergeInputError, load_merged
from adamerge.io.extensions import EXTENSIONS, ExportExtension, NoHook
from adamerge.methods import METHODS, MergeModule, register_method
from adamerge.parametrize import Coefficients

TOY_FILE = "toy_offsets.safetensors"


class OffsetHook(NoHook):
    """Adds each task's own offset vector to the pooled feature its head reads."""

    def __init__(self, offsets: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.offsets = offsets

    def features(self, task, features):
        return type(features)(**{**features, "pooler_output": features["pooler_output"] + self.offsets[task]})


def serve_offsets(path, info, backbone, dtype):
    tensors = load_file(str(path / info["file"]))
    return OffsetHook({k.split("/")[0]: v.to(dtype) for k, v in tensors.items()})


TOY_EXPORT = ExportExtension(
    key="toy_offsets",
    module=__name__,
    serve=serve_offsets,
    card=lambda info: f"This toy export shifts each pooled feature by {info['norm']:.2f}.\n",
)


class ToyOffsetMerge(MergeModule):
    """Task Arithmetic at λ = 0.5, plus a fixed per-task offset on the pooled feature (exported, served)."""

    trainable = False
    method = "toy_offset"
    extension = TOY_EXPORT

    def build_coefficients(self, pool):
        c = Coefficients(len(pool.task_names), len(pool.param_names), "task", 0.5)
        return c.requires_grad_(False)

    def offsets(self) -> dict[str, torch.Tensor]:
        dim = self.merged.backbone.config.hidden_size
        return {t: torch.linspace(-1, 1, dim) * (i + 1) for i, t in enumerate(self.task_names)}

    def manifest_fields(self):
        norm = sum(float(v.norm()) for v in self.offsets().values())
        return {"toy_offsets": {"file": TOY_FILE, "norm": norm}}

    def extra_export_files(self):
        return {TOY_FILE: {f"{t}/offset": v for t, v in self.offsets().items()}}


@pytest.fixture
def toy_registered():
    register_method(ToyOffsetMerge)
    yield
    METHODS.pop("toy_offset", None)
    EXTENSIONS.pop("toy_offsets", None)


def test_a_method_from_outside_the_package_exports_serves_and_cards(tmp_path, zoo, toy_registered):
    base, paths = zoo
    out = ToyOffsetMerge(base, paths).export(tmp_path / "toy")

    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["extensions"] == {"toy_offsets": __name__}
    assert manifest["toy_offsets"]["file"] == TOY_FILE and "toy_offsets" in manifest["settings"]
    assert set(load_file(str(out / TOY_FILE))) == {f"{t}/offset" for t in paths}
    card = (out / "README.md").read_text()
    assert f"This toy export shifts each pooled feature by {manifest['toy_offsets']['norm']:.2f}." in card
    assert '"toy_offsets"' in card  # listed under the method's settings

    served = load_merged(out)
    tok = AutoTokenizer.from_pretrained(base)
    batch = tok(["good movie", "call now win a prize"], return_tensors="pt", padding=True)
    for i, task in enumerate(paths):
        # reference: the stock per-task model, its classifier applied to its pooled feature plus the offset
        stock = AutoModelForSequenceClassification.from_pretrained(str(out / "tasks" / task)).eval()
        with torch.no_grad():
            pooled = stock.bert(**batch).pooler_output
            offset = torch.linspace(-1, 1, pooled.shape[-1]) * (i + 1)
            want = stock.classifier(pooled + offset)
            plain = stock.classifier(pooled)
        got = served.predict(task, **batch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, plain, atol=1e-3)  # the hook is what made the difference


def test_an_export_whose_extension_is_not_imported_is_refused_by_name(tmp_path, zoo, toy_registered):
    base, paths = zoo
    out = ToyOffsetMerge(base, paths).export(tmp_path / "toy", model_card=False)
    EXTENSIONS.pop("toy_offsets")
    with pytest.raises(MergeInputError, match=r"extension 'toy_offsets' registered by module '.*test_extensions'"):
        load_merged(out)


def test_register_method_refuses_a_taken_name_and_a_non_method():
    class Clash(ToyOffsetMerge):
        method = "task_arithmetic"

    with pytest.raises(MergeInputError, match="'task_arithmetic' is taken by TaskArithmetic"):
        register_method(Clash)
    with pytest.raises(MergeInputError, match="not a MergeModule subclass"):
        register_method(dict)
