"""Safetensors writing and reading: atomic directories, streamed writes tensor by tensor, shard plans and index files,
and a lazy reader of (sharded) weights. No knowledge of models or methods.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adamerge.errors import MergeInputError


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``target``; on success rename it to ``target``.

    Refuses an existing ``target`` unless ``overwrite``; on any error (or interrupt) the temporary directory is
    removed and ``target`` is untouched.
    """
    target = Path(target).resolve()
    if target.exists() and not overwrite:
        raise MergeInputError(f"output_dir {target} already exists; pass overwrite=True (--overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _contiguous(state: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    return {k: _stored(v, dtype).clone() for k, v in state.items()}


# -- streaming, sharded safetensors ----------------------------------------------------------------------------------
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_ST_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


WEIGHTS_INDEX = "model.safetensors.index.json"


def store_dtype(name: str, field: str = "dtype") -> torch.dtype:
    if name not in STORE_DTYPES:
        raise MergeInputError(f"{field}: unknown dtype {name!r}; allowed: {', '.join(STORE_DTYPES)}")
    return STORE_DTYPES[name]


def parse_size(size: int | str, field: str = "max_shard_size") -> int:
    """Bytes in ``size``: an int, or digits and a unit as ``transformers`` reads them — ``KB``/``MB``/``GB``/``TB``
    are powers of 10, ``KiB``/``MiB``/``GiB``/``TiB`` powers of 2 (case-insensitive)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        text = str(size).strip()
        units = {
            "TIB": 2**40,
            "GIB": 2**30,
            "MIB": 2**20,
            "KIB": 2**10,
            "TB": 10**12,
            "GB": 10**9,
            "MB": 10**6,
            "KB": 10**3,
            "B": 1,
        }
        unit = next((u for u in units if text.upper().endswith(u)), None)
        number = text[: len(text) - len(unit)].strip() if unit else text
        try:
            value = int(float(number) * (units[unit] if unit else 1))
        except ValueError:
            raise MergeInputError(
                f"{field}: cannot read {size!r} as a size; write e.g. '5GB', '500MB' or '100KB'"
            ) from None
    if value <= 0:
        raise MergeInputError(f"{field}: must be positive, got {size!r}")
    return value


def _stored(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``t`` on the CPU, contiguous, floating tensors cast to ``dtype`` (None keeps them)."""
    t = t.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to("cpu").contiguous()


def _tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def write_safetensors(
    path: Path,
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], Tensor],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write a safetensors file tensor by tensor: the header is planned from ``entries`` (name, shape, stored
    dtype), then each tensor is obtained from ``produce(name)``, cast, written and dropped — at most one tensor is
    held at a time. Returns the bytes of tensor data written."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in entries:
        if dtype not in _ST_CODES:
            raise MergeInputError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        size = _tensor_bytes(shape, dtype)
        header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, dtype in entries:
            t = _stored(produce(name), dtype)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(
                    f"tensor {name!r}: planned {tuple(shape)} {dtype}, produced {tuple(t.shape)} {t.dtype}"
                )
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
    return offset


def plan_shards(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list]:
    """Split ``entries`` in order into shards of at most ``max_bytes`` of tensor data (a larger tensor gets a shard
    of its own), as ``transformers.save_pretrained`` does."""
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        b = _tensor_bytes(e[1], e[2])
        if shards[-1] and size + b > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += b
    return shards


def write_weights(
    directory: Path,
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], Tensor],
    max_shard_size: int | str = "5GB",
    apart: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """``model.safetensors``, or — when the tensors exceed ``max_shard_size`` — ``model-0000k-of-0000n.safetensors``
    plus ``model.safetensors.index.json``, the layout ``transformers.from_pretrained`` reads. Streams (see
    :func:`write_safetensors`). ``apart``: tensors kept in shards of their own, after the others (a checkpoint that
    links this one's files and holds its own values of them links every shard but those). Returns the file names
    written."""
    rest = [e for e in entries if e[0] not in apart]
    shards = plan_shards(rest, parse_size(max_shard_size))
    if len(rest) < len(entries):
        shards += plan_shards([e for e in entries if e[0] in apart], parse_size(max_shard_size))
    if len(shards) == 1:
        write_safetensors(directory / "model.safetensors", shards[0], produce)
        return ["model.safetensors"]
    n, weight_map, total, files = len(shards), {}, 0, []
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{n:05d}.safetensors"
        total += write_safetensors(directory / name, shard, produce)
        weight_map.update({e[0]: name for e in shard})
        files.append(name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*files, WEIGHTS_INDEX]


class WeightReader:
    """Read the tensors of an exported ``model.safetensors`` or sharded ``model-*.safetensors`` one at a time
    (memory-mapped)."""

    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        directory = Path(directory)
        index = directory / WEIGHTS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / "model.safetensors").is_file():
            weight_map = None
        else:
            raise MergeInputError(f"{directory}: no model.safetensors or {WEIGHTS_INDEX}")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        try:
            self._handles = {f: safe_open(str(directory / f), framework="pt") for f in files}
        except Exception as e:
            raise MergeInputError(f"cannot read the weights of {directory}: {e}") from e
        self._where = weight_map or {k: "model.safetensors" for k in self._handles["model.safetensors"].keys()}

    def get(self, name: str) -> Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def read_all(self) -> dict[str, Tensor]:
        return {k: self.get(k) for k in self._where}


def read_weights(directory: str | Path) -> dict[str, Tensor]:
    """Every tensor of an exported checkpoint's weights (single file or sharded)."""
    return WeightReader(directory).read_all()
