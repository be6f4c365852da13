"""A callback recording how the task vectors are sharded (for the ModelParallelStrategy test)."""

import json
from pathlib import Path

import pytorch_lightning as pl


class ShardProbe(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        stores = pl_module.merged.stores
        tvs = [p for st in stores for p in st.parameters()]
        self.info = {"stores": len(stores),
                     "sharded_stores": sum(all(isinstance(p, DTensor) for p in st.parameters()) for st in stores),
                     "local_elements": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in tvs),
                     "global_elements": sum(p.numel() for p in tvs)}

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            out = Path(trainer.default_root_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "shard_probe.json").write_text(json.dumps(self.info))
