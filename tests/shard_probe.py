"""A callback recording how the task vectors are sharded (for the ModelParallelStrategy test)."""

import json
from pathlib import Path

import pytorch_lightning as pl


class ShardProbe(pl.Callback):
    """Also counts how often the first layer's task-vector store merges in the first training step."""

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        stores = pl_module.merged.stores
        tvs = [p for st in stores for p in st.parameters()]
        self.info = {
            "stores": len(stores),
            "sharded_stores": sum(all(isinstance(p, DTensor) for p in st.parameters()) for st in stores),
            "local_elements": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in tvs),
            "global_elements": sum(p.numel() for p in tvs),
            "first_layer_merges": None,
        }
        self.calls = 0
        first = stores[pl_module.merged.layer_stores[0][0]]
        first.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.calls = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.info["first_layer_merges"] is None:
            self.info["first_layer_merges"] = self.calls

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            out = Path(trainer.default_root_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "shard_probe.json").write_text(json.dumps(self.info))
