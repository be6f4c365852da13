"""A callback that SIGKILLs its own process at a given step (for the kill-and-resume test)."""

import os
import signal

import pytorch_lightning as pl


class KillAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
