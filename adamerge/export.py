"""Export a merge as a flattened Hugging Face checkpoint, atomically.

Layout of ``output_dir``::

    config.json, model.safetensors   the merged backbone: ``transformers.AutoModel.from_pretrained(output_dir)``
                                     (causal LMs: the whole merged ``AutoModelForCausalLM``); above
                                     ``max_shard_size``: ``model-0000k-of-0000n.safetensors`` +
                                     ``model.safetensors.index.json``, as ``save_pretrained`` writes them
    tokenizer files                  the base model's (the union vocabulary when fine-tunes added tokens)
    heads.safetensors                every task's head, keys ``<task>/<param>``
    task_buffers.safetensors         (optional, ``batchnorm_statistics: task``) each task's own BatchNorm running
                                     statistics, keys ``<task>/<buffer>``: they replace the root's for that task in
                                     ``tasks/<task>/``, :func:`load_task_model` and ``adamerge.load_merged``
    adapters/<task>/                 (optional, merges of LoRA adapters) a PEFT LoRA adapter per task
    tasks/<task>/                    (optional) a complete ``*ForSequenceClassification`` checkpoint per task:
                                     ``AutoModelForSequenceClassification.from_pretrained(output_dir / "tasks" / task)``
    README.md, coefficients.png      (optional) the Hub model card (see :mod:`adamerge.card`)
    merge_manifest.json              method, base and sources with content hashes, coefficients, dtype, versions

Weights are written tensor by tensor (a lazy merge is merged one block at a time on access), stored in ``dtype``.
Everything is written into a temporary sibling directory that is renamed into place at the end, so an interrupted
export never leaves a half-written ``output_dir``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from adamerge.errors import MergeInputError

log = logging.getLogger(__name__)

MANIFEST = "merge_manifest.json"
HEADS = "heads.safetensors"
TASK_BUFFERS = "task_buffers.safetensors"


def versions() -> dict[str, str]:
    import transformers

    from adamerge import __version__

    return {"adamerge": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


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
_ST_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
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
        units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6,
                 "KB": 10**3, "B": 1}
        unit = next((u for u in units if text.upper().endswith(u)), None)
        number = text[: len(text) - len(unit)].strip() if unit else text
        try:
            value = int(float(number) * (units[unit] if unit else 1))
        except ValueError:
            raise MergeInputError(f"{field}: cannot read {size!r} as a size; write e.g. '5GB', '500MB' or '100KB'") \
                from None
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


def write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                      produce: Callable[[str], Tensor], metadata: Mapping[str, str] | None = None) -> int:
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
                raise RuntimeError(f"tensor {name!r}: planned {tuple(shape)} {dtype}, produced {tuple(t.shape)} "
                                   f"{t.dtype}")
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


def write_weights(directory: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                  produce: Callable[[str], Tensor], max_shard_size: int | str = "5GB") -> list[str]:
    """``model.safetensors``, or — when the tensors exceed ``max_shard_size`` — ``model-0000k-of-0000n.safetensors``
    plus ``model.safetensors.index.json``, the layout ``transformers.from_pretrained`` reads. Streams (see
    :func:`write_safetensors`). Returns the file names written."""
    shards = plan_shards(entries, parse_size(max_shard_size))
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


def _load_preprocessor(kind, source: str):
    """The base's tokenizer (text kinds) or image processor (image kinds), or None with a warning."""
    try:
        return kind.preprocessor(source)
    except (OSError, ValueError) as e:
        log.warning("no %s copied from %s: %s", "tokenizer" if kind.modality == "text" else "image processor",
                    source, e)
        return None


def head_state(head: torch.nn.Module) -> dict[str, Tensor]:
    """A head shell's own parameters (its backbone is a stub)."""
    return {k: v for k, v in head.state_dict().items()}


@dataclass
class ExportOptions:
    """How a merge is written (``adamerge merge``: top-level keys; ``adamerge fit``: ``export.*`` keys).

    Args:
        per_task_models: also write ``tasks/<task>/``, a complete sequence-classification checkpoint per task.
        lora_adapters: for merges of LoRA adapters, also write ``adapters/<task>/`` PEFT adapters.
        model_card: write ``README.md``, a Hub model card (front matter, sources, coefficients, data, config).
        max_shard_size: largest weights file, e.g. ``"5GB"`` (the ``transformers`` default), ``"500MB"``; larger
            models are written as ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
        dtype: dtype of the stored weights: ``float32``, ``bfloat16`` or ``float16`` (merging computes in float32).
        push_to_hub: a Hub repo id (``user/name``): upload the finished export there (token: ``HF_TOKEN`` or
            ``hf auth login``).
        hub_private: create the repo private (when it does not exist yet).
        hub_revision: upload to this branch (created if missing); default the repo's main branch.
    """

    per_task_models: bool = True
    lora_adapters: bool = False
    model_card: bool = True
    max_shard_size: str = "5GB"
    dtype: str = "float32"
    push_to_hub: str | None = None
    hub_private: bool = False
    hub_revision: str | None = None

    def __post_init__(self) -> None:
        store_dtype(self.dtype)
        parse_size(self.max_shard_size)
        if self.push_to_hub is not None and not str(self.push_to_hub).strip():
            raise MergeInputError("push_to_hub: empty repo id; give `user/name` or leave it unset")


def _set_dtype(config, dtype: torch.dtype) -> None:
    """Record the stored dtype in a config (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        config.dtype = dtype
    else:
        config.torch_dtype = dtype


def write_merged(output_dir: str | Path, backbone: torch.nn.Module, merged: Mapping[str, Tensor],
                 heads: Mapping[str, torch.nn.Module], manifest: dict[str, Any], tokenizer_source: str | None = None,
                 per_task_models: bool = True, overwrite: bool = False,
                 extra_files: Mapping[str, Mapping[str, Tensor]] | None = None,
                 extra_writer: Callable[[Path], Any] | None = None, tokenizer: Any = None,
                 dtype: str = "float32", max_shard_size: int | str = "5GB", model_card: bool = True,
                 kind=None, task_tensors: Mapping[str, Mapping[str, Tensor]] | None = None) -> Path:
    """Write the flattened checkpoint (see module docstring) and return its path.

    Args:
        backbone: the base backbone module (supplies config and the non-merged tensors).
        merged: merged backbone tensors by parameter name; read one at a time, so a lazy mapping (one block merged
            on access, :meth:`adamerge.merged.MergedModel.lazy_merged_params`) keeps the export to one block's
            memory beyond the model.
        heads: task → head (a ``*For<Task>`` shell whose backbone is a stub, or the kind's own head module).
        manifest: method-specific fields; versions and the layout are added here.
        extra_files: more safetensors files to write, name → tensors (e.g. surgery adapters).
        extra_writer: called with the temporary directory to write more files (e.g. PEFT adapters); its return
            value is recorded in the manifest as ``extra``.
        tokenizer: a tokenizer object to save (e.g. a union vocabulary); else the kind's preprocessor (tokenizer or
            image processor) of ``tokenizer_source``.
        dtype, max_shard_size, model_card: see :class:`ExportOptions`.
        kind: the model kind (:mod:`adamerge.kinds`; default ``seq_cls``): what the heads are, how a per-task
            checkpoint is written.
        task_tensors: task → backbone tensors of that task's own that replace the merged ones in its per-task
            checkpoint (BatchNorm statistics per task), also written to ``task_buffers.safetensors``.
    """
    from adamerge.kinds import get_kind

    kind = kind or get_kind("seq_cls")
    target_dtype = store_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    state = backbone.state_dict()  # references to the base tensors, no copies
    tied: dict[str, str] = {}
    canonical: dict[int, str] = {}
    for name, p in backbone.named_parameters(remove_duplicate=False):  # tied weights (e.g. lm_head = embeddings)
        tied[name] = canonical.setdefault(id(p), name)
    names = [k for k in state if not k.endswith(("position_ids",))]

    def produce(name: str) -> Tensor:
        if name in merged:
            return merged[name]
        if tied.get(name, name) in merged:
            return merged[tied[name]]
        return state[name]

    def stored(t: Tensor) -> torch.dtype:
        return target_dtype if t.is_floating_point() else t.dtype

    entries = [(n, tuple(state[n].shape), stored(state[n])) for n in names]
    for task, own in (task_tensors or {}).items():
        unknown = sorted(set(own) - set(names))
        if unknown:
            raise MergeInputError(f"task_tensors[{task!r}]: {unknown[:3]} are not tensors of the backbone")
    config = copy.deepcopy(backbone.config)
    config.architectures = [type(backbone).__name__]  # the root is exactly this class: AutoModel(ForCausalLM) loads it
    _set_dtype(config, target_dtype)
    if tokenizer is None and tokenizer_source:  # loaded once, saved into the root and every tasks/<task>/
        tokenizer = _load_preprocessor(kind, tokenizer_source)
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        files = write_weights(tmp, entries, produce, max_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        head_tensors, head_info, wrote_tasks = {}, {}, False
        root = WeightReader(tmp)
        for task, head in heads.items():
            hs = head_state(head)
            head_tensors.update({f"{task}/{k}": v for k, v in hs.items()})
            head_info[task] = {**kind.head_info(head), "params": sorted(hs)}
            task_files = kind.task_model_files(head, config) if per_task_models else None
            if task_files is not None:
                wrote_tasks = True
                head_config, prefix = task_files
                d = tmp / "tasks" / task
                d.mkdir(parents=True)
                _set_dtype(head_config, target_dtype)
                head_config.save_pretrained(str(d))
                # a head that holds its own pooler (heads: {pooler: true}) replaces the merged one
                task_entries = [(f"{prefix}.{n}", s, dt) for n, s, dt in entries if f"{prefix}.{n}" not in hs]
                task_entries += [(k, tuple(v.shape), stored(v)) for k, v in hs.items()]
                own = (task_tensors or {}).get(task, {})

                def task_tensor(k, hs=hs, prefix=prefix, own=own):
                    if k in hs:
                        return hs[k]
                    name = k[len(prefix) + 1:]
                    return own[name] if name in own else root.get(name)

                write_weights(d, task_entries, task_tensor, max_bytes)
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(d))
        per_task_models = wrote_tasks
        del root
        save_file(_contiguous(head_tensors, target_dtype), str(tmp / HEADS), metadata={"format": "pt"})
        if task_tensors:
            save_file(_contiguous({f"{t}/{n}": v for t, own in task_tensors.items() for n, v in own.items()},
                                  target_dtype), str(tmp / TASK_BUFFERS), metadata={"format": "pt"})
            manifest = {**manifest, "task_buffers": {"file": TASK_BUFFERS, "tasks": sorted(task_tensors),
                                                     "tensors": sorted({n for own in task_tensors.values()
                                                                        for n in own})}}
        for name, tensors in (extra_files or {}).items():
            save_file(_contiguous(tensors), str(tmp / name), metadata={"format": "pt"})
        extra = extra_writer(tmp) if extra_writer else None
        if extra is not None:
            manifest = {**manifest, "extra": [str(Path(p).relative_to(tmp)) for p in extra]}
        doc = {**manifest, "task_type": kind.name, "heads": head_info, "per_task_models": per_task_models,
               "weights": {"dtype": dtype, "max_shard_size": str(max_shard_size), "files": files},
               "model_card": model_card, "versions": versions(),
               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        (tmp / MANIFEST).write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
        if model_card:
            from adamerge.card import write_card

            write_card(tmp)
    log.info("exported merged checkpoint to %s", output_dir)
    return Path(output_dir)


class UploadError(MergeInputError):
    """The upload to the Hub failed; the local export is complete."""


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
                commit_message: str = "adamerge export") -> str:
    """Upload a finished export folder to the Hub model repo ``repo_id`` (created if missing; ``revision``: a
    branch, created if missing), with the token ``huggingface_hub`` finds (``HF_TOKEN``, ``hf auth login``).
    Returns the commit URL. Untested against the live Hub (no network where adamerge is tested): the calls are."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=commit_message)
    except Exception as e:  # network, auth, permissions: huggingface_hub raises many types
        retry = f"hf upload {repo_id} {folder} ." + (f" --revision {revision}" if revision else "")
        raise UploadError(f"upload of {folder} to the Hub repo {repo_id!r} failed ({type(e).__name__}: {e}); the "
                          f"export is complete at {folder}: retry with `{retry}`") from e
    url = str(getattr(info, "commit_url", None) or info)
    log.info("uploaded %s to %s", folder, url)
    return url


def _json_default(o):
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.dtype):
        return str(o).removeprefix("torch.")
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise MergeInputError(f"{path} is not an adamerge checkpoint: {MANIFEST} is missing")
    return json.loads(p.read_text())


def load_task_model(path: str | Path, task: str, dtype: torch.dtype = torch.float32):
    """A stock ``AutoModelFor<Task>`` (sequence or image classification) for ``task`` from an exported checkpoint
    (works without ``tasks/``)."""
    from safetensors.torch import load_file

    from adamerge.kinds import get_kind

    path = Path(path)
    manifest = read_manifest(path)
    if task not in manifest["heads"]:
        raise MergeInputError(f"task {task!r} not in checkpoint {path}; tasks: {sorted(manifest['heads'])}")
    kind = get_kind(manifest_kind(manifest))
    heads = load_file(str(path / HEADS))
    head = {k.split("/", 1)[1]: v for k, v in heads.items() if k.startswith(task + "/")}
    return kind.task_model(path, task, manifest["heads"][task], {**read_weights(path), **task_buffers(path, task)},
                           head, dtype)


def task_buffers(path: str | Path, task: str, manifest: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """The backbone tensors of ``task``'s own in an export (its BatchNorm statistics, ``task_buffers.safetensors``),
    by backbone name; empty when the export has none."""
    from safetensors.torch import load_file

    manifest = read_manifest(path) if manifest is None else manifest
    info = manifest.get("task_buffers")
    if not info or task not in info["tasks"]:
        return {}
    tensors = load_file(str(Path(path) / info["file"]))
    return {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(task + "/")}


def manifest_kind(manifest: Mapping[str, Any]) -> str:
    """The model kind of an export (manifests before kinds were recorded: ``seq_cls`` when it has heads, else
    ``causal_lm``)."""
    return manifest.get("task_type") or ("seq_cls" if manifest.get("heads") else "causal_lm")
