"""On a CUDA device, coefficient training gives the CPU's coefficients (skipped where there is no GPU).

The same three fixed batches drive a layer-wise AdaMerging fit on CPU and on the GPU, with float32 and bfloat16 task
vector storage, in one batch and in task chunks, and on the GPU also with layers re-run (and re-merged) in the
backward (``recompute``).
"""

from __future__ import annotations

import pytest
import torch

from adamerge.methods import AdaMerging

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    "tv_dtype, recompute", [(None, None), ("bfloat16", None), ("bfloat16", "activations"), ("bfloat16", "merge")]
)
@pytest.mark.parametrize("chunks", [1, 3])
def test_gpu_fit_matches_cpu(zoo, tv_dtype, recompute, chunks):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    class WhereItRuns(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            merged = pl_module.merged
            devices.add((merged.coefficients.weight.device.type, merged.task_vector(merged.param_names[0]).device.type))

    from conftest import mixed_batch

    data = [mixed_batch(zoo[0], rotate=i) for i in range(3)]
    result = {}
    for accelerator in ("cpu", "gpu"):
        devices: set = set()
        pl.seed_everything(0, verbose=False)
        module = AdaMerging(
            *zoo,
            granularity="layer",
            lr=0.01,
            tv_dtype=tv_dtype,
            task_chunks=chunks,
            recompute=recompute if accelerator == "gpu" else None,
        )  # the CPU run is the plain step
        trainer = pl.Trainer(
            max_steps=3,
            accelerator=accelerator,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[WhereItRuns()],
        )
        trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
        assert devices == ({("cuda", "cuda")} if accelerator == "gpu" else {("cpu", "cpu")})
        result[accelerator] = module.merged.coefficients.weight.detach().cpu()
    assert (result["cpu"] - 0.3).abs().max() > 1e-3  # it trained
    torch.testing.assert_close(result["gpu"], result["cpu"], atol=2e-5, rtol=0)


@pytest.mark.parametrize("chunks", [1, 3])
def test_gpu_offloaded_task_vectors_stream_and_match_cpu(zoo, chunks):
    """prep.offload: on the GPU the task vectors stay in pinned CPU memory (coefficients and base on the GPU), are
    streamed per block, and 3 steps give the CPU's coefficients."""
    import pytorch_lightning as pl
    from conftest import mixed_batch
    from torch.utils.data import DataLoader

    from adamerge.methods.base import TaskVectorPrep

    data = [mixed_batch(zoo[0], rotate=i) for i in range(3)]
    result = {}
    for accelerator in ("cpu", "gpu"):
        pl.seed_everything(0, verbose=False)
        module = AdaMerging(
            *zoo,
            granularity="layer",
            lr=0.01,
            tv_dtype="bfloat16",
            task_chunks=chunks,
            prep=TaskVectorPrep(offload=accelerator == "gpu"),
        )
        trainer = pl.Trainer(
            max_steps=3,
            accelerator=accelerator,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
        if accelerator == "gpu":
            merged = module.merged
            assert merged.coefficients.weight.device.type == "cuda"
            assert all(p.device.type == "cpu" and p.is_pinned() for st in merged.stores for p in st.parameters())
        result[accelerator] = module.merged.coefficients.weight.detach().cpu()
    assert (result["cpu"] - 0.3).abs().max() > 1e-3
    torch.testing.assert_close(result["gpu"], result["cpu"], atol=2e-5, rtol=0)


def test_gpu_concrete_trains_and_exports_like_cpu(zoo):
    """Concrete's relaxed masks draw on the logits' device while training (no CPU generator reaches a CUDA tensor),
    and the exported ``continuous`` mask is one CPU-seeded draw: the same on either device for the same logits."""
    import pytorch_lightning as pl
    from conftest import mixed_batch
    from torch.utils.data import DataLoader

    from adamerge.methods import ConcreteTaskArithmetic

    data = [mixed_batch(zoo[0], rotate=i) for i in range(3)]
    pl.seed_everything(0, verbose=False)
    module = ConcreteTaskArithmetic(*zoo, scale=0.3, lr=0.05, export_mask="continuous")
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="gpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    logits = {n: p.detach().cpu() for n, p in module.mask.logits.items()}
    assert max(float(v.abs().max()) for v in logits.values()) > 1e-3  # it trained
    on_cpu = module.mask.hard("continuous", seed=7)
    module.mask.cuda()
    on_gpu = module.mask.hard("continuous", seed=7)
    for name in on_cpu:
        assert on_gpu[name].device.type == "cuda"
        torch.testing.assert_close(on_gpu[name].cpu(), on_cpu[name], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_summed_batch_norm_matches_torch_and_cpu(dtype):
    """The rank-summed batch norm that data-parallel BatchNorm training uses (one process here: the sum is the
    identity) on CUDA, float32 sums: outputs and gradients equal torch's own training-mode batch_norm on the GPU and
    the same function on CPU (float64 sums)."""
    from adamerge.core.functional import summed_batch_norm

    torch.manual_seed(0)
    x = torch.randn(32, 16, 8, 8) * 3 + 2
    w, b, g = torch.randn(16), torch.randn(16), torch.randn(32, 16, 8, 8)
    results = {}
    for device, fn in (("cuda", "summed"), ("cuda", "torch"), ("cpu", "summed")):
        xs, ws, bs = (t.to(device, dtype).requires_grad_(True) for t in (x, w, b))
        if fn == "summed":
            y = summed_batch_norm(xs, ws, bs, 1e-3, lambda t: t)
        else:
            y = torch.nn.functional.batch_norm(xs, None, None, ws, bs, True, 0.0, 1e-3)
        grads = torch.autograd.grad((y.float() * g.to(device)).sum(), (xs, ws, bs))
        results[device, fn] = [t.detach().float().cpu() for t in (y, *grads)]
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    for other in (("cuda", "torch"), ("cpu", "summed")):
        for got, want in zip(results["cuda", "summed"], results[other]):
            torch.testing.assert_close(got, want, **tol)
