"""The learning-rate schedule callback: closed-form factors, the rates every optimizer actually steps with (one
optimizer, and Concrete AdaMerging's two under manual optimization), resume, manifest and bad input."""

import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import TASKS

from adamerge.errors import MergeInputError
from adamerge.training.callbacks import LRSchedule


def test_factors_match_their_closed_forms():
    # cosine over 4 steps: (1 + cos(pi k / 4)) / 2, written out
    cos = LRSchedule("cosine")
    assert [cos.factor(k, 4) for k in range(4)] == pytest.approx([1.0, 0.8535533906, 0.5, 0.1464466094])
    assert [LRSchedule("linear").factor(k, 4) for k in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert [LRSchedule("constant").factor(k, 4) for k in range(4)] == [1.0] * 4
    # two warm-up steps (1/2, 2/2), then a linear decay over the 4 left, ending at 0.2 + 0.8 * (1/4)
    warm = LRSchedule("linear", warmup_steps=2, final_fraction=0.2)
    assert [warm.factor(k, 6) for k in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.8, 0.6, 0.4])
    assert LRSchedule("cosine", final_fraction=0.1).factor(2, 4) == pytest.approx(0.1 + 0.9 * 0.5)


class _Linear(pl.LightningModule):
    """p moves by exactly -lr per SGD step (the loss is p, its gradient 1)."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return self.p * 1.0

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD([self.p], lr=0.1)


class _StopAt(pl.Callback):
    """Stops the run after ``step`` optimizer steps; the schedule's length stays ``max_steps``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _trainer(steps, callbacks, **kw):
    return pl.Trainer(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=callbacks,
        **kw,
    )


def test_sgd_takes_the_scheduled_steps_and_a_resumed_run_continues_them(tmp_path):
    # reference: p after K steps is -sum_k 0.1 * (1 + cos(pi k / K)) / 2, from the formula, not from the callback
    expected = -sum(0.1 * (1 + math.cos(math.pi * k / 6)) / 2 for k in range(6))
    straight = _Linear()
    _trainer(6, [LRSchedule("cosine")], enable_checkpointing=False).fit(straight)
    assert float(straight.p) == pytest.approx(expected, abs=1e-6)
    assert float(straight.p) != pytest.approx(-0.6, abs=1e-3)  # not the constant rate's

    # interrupted after 2 steps of the same 6-step schedule, then resumed from the checkpoint
    first = _Linear()
    t = _trainer(6, [LRSchedule("cosine"), _StopAt(2)], enable_checkpointing=False)
    t.fit(first)
    assert t.global_step == 2
    assert float(first.p) == pytest.approx(-0.1 * (1 + (1 + math.cos(math.pi / 6)) / 2), abs=1e-6)
    ckpt = tmp_path / "mid.ckpt"
    t.save_checkpoint(ckpt)
    resumed = _Linear()
    _trainer(6, [LRSchedule("cosine")], enable_checkpointing=False).fit(resumed, ckpt_path=str(ckpt))
    assert float(resumed.p) == pytest.approx(expected, abs=1e-6)


class _RateLog(pl.Callback):
    def __init__(self):
        self.rates = []  # (step, optimizer index, lr) at every optimizer step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        idx = next(i for i, o in enumerate(trainer.optimizers) if o is optimizer)
        self.rates.append((int(trainer.global_step), idx, optimizer.param_groups[0]["lr"]))


def _fit(module, zoo, task_data, steps, callbacks):
    from adamerge.io.datasets import TaskData
    from adamerge.training.datamodule import UnlabeledDataModule

    dm = UnlabeledDataModule(
        {t: TaskData(p) for t, p in task_data.items()}, tokenizer=zoo[0], samples_per_task=4, max_length=16
    )
    pl.seed_everything(0, verbose=False)
    _trainer(steps, callbacks, enable_checkpointing=False).fit(module, datamodule=dm)


def test_concrete_adamerging_steps_each_optimizer_at_its_scheduled_rate(zoo, task_data):
    """Manual optimization, two optimizers: the mask's (meta steps 0, 1) and the coefficients' (steps 2, 3)."""
    from adamerge.methods import ConcreteAdaMerging

    base, paths = zoo
    module = ConcreteAdaMerging(base, paths, meta_steps=2, mask_lr=0.5, lr=0.2)
    log, schedule = _RateLog(), LRSchedule("linear")
    _fit(module, zoo, task_data, 4, [schedule, log])
    assert [(s, i) for s, i, _ in log.rates] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert [r for _, _, r in log.rates] == pytest.approx([0.5, 0.5 * 0.75, 0.2 * 0.5, 0.2 * 0.25])
    recorded = module.manifest(schedule.manifest_entries())["lr_schedule"]  # handed over by the callback
    assert recorded == {"kind": "linear", "warmup_steps": 0, "final_fraction": 0.0, "total_steps": 4}


def test_concrete_task_arithmetic_records_the_schedule_and_trains_at_its_rates(zoo, task_data):
    from adamerge.methods import ConcreteTaskArithmetic

    base, paths = zoo
    module = ConcreteTaskArithmetic(base, paths, coefficients="layer", scale=1.0, lr=0.1, export_mask="expected")
    log, schedule = _RateLog(), LRSchedule("cosine", warmup_steps=1)
    _fit(module, zoo, task_data, 3, [schedule, log])
    assert [r for _, _, r in log.rates] == pytest.approx([0.1, 0.1, 0.1 * 0.5])
    assert module.manifest(schedule.manifest_entries())["lr_schedule"]["kind"] == "cosine"
    assert len(module.task_names) == len(TASKS)


def test_bad_schedules_are_refused_by_field():
    with pytest.raises(MergeInputError, match="kind: unknown value 'step'; allowed: constant, cosine, linear"):
        LRSchedule("step")
    with pytest.raises(MergeInputError, match="final_fraction must be in"):
        LRSchedule(final_fraction=1.5)
    with pytest.raises(MergeInputError, match="warmup_steps must be >= 0"):
        LRSchedule(warmup_steps=-1)
    module = _Linear()
    with pytest.raises(MergeInputError, match=r"warmup_steps \(3\) leaves no step"):
        _trainer(3, [LRSchedule(warmup_steps=3)], enable_checkpointing=False).fit(module)
    assert float(module.p) == 0.0  # refused before any step
    with pytest.raises(MergeInputError, match="needs trainer.max_steps"):
        _trainer(-1, [LRSchedule()], enable_checkpointing=False, max_epochs=1).fit(_Linear())
