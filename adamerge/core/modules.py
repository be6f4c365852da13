"""Small helpers on modules and model outputs: slicing and concatenating outputs, eval mode in a block, and the
block (layer) a tensor name belongs to.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor


def slice_output(output, sl: slice):
    """Slice every batch-first tensor of a ``transformers`` ModelOutput (or tuple) along dim 0."""
    if isinstance(output, Tensor):
        return output[sl]
    if isinstance(output, tuple) and not hasattr(output, "keys"):
        return tuple(slice_output(o, sl) for o in output)
    return type(output)(**{k: slice_output(v, sl) if isinstance(v, (Tensor, tuple)) else v for k, v in output.items()})


def cat_outputs(outputs: list):
    """Concatenate the batch-first tensors of several ``transformers`` ModelOutputs (or tuples) of one structure along
    dim 0 (the inverse of :func:`slice_output` over consecutive slices)."""
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.cat(outputs)
    if isinstance(first, tuple) and not hasattr(first, "keys"):
        return tuple(cat_outputs([o[i] for o in outputs]) for i in range(len(first)))
    return type(first)(
        **{k: cat_outputs([o[k] for o in outputs]) if isinstance(v, (Tensor, tuple)) else v for k, v in first.items()}
    )


@contextmanager
def eval_mode(module: torch.nn.Module):
    """Every submodule in eval mode inside the block, then each one's own mode back. (``module.train(was_training)``
    would switch on the dropout of a backbone that trains in eval mode.)"""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def block_of(name: str) -> str:
    """Group key of a tensor: its path up to the first layer index (``encoder.layer.3``), else its first component."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]
