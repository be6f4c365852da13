"""Export extensions: what a method adds to an export beyond the merged backbone and the heads, declared by the method.

A method whose merge cannot be flattened into plain weights (Surgery's adapters, WEMoE's routers) writes extra files
and a manifest entry, and needs code to serve them. It declares all of that in one :class:`ExportExtension`, which it
registers with :func:`register_extension` in a module that imports no Lightning (serving must not), and names as its
``extension`` attribute. The export records ``{"extensions": {key: module}}``; ``adamerge.load_merged`` finds the
extension in the registry (importing ``module`` first when it is one of adamerge's own) and the model card takes its
paragraph from it — no shared file lists method-specific keys.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from adamerge.errors import MergeInputError


class ServingHook(Protocol):
    """How a served export runs an extension around the merged backbone."""

    def context(self, inputs: Mapping[str, Tensor]) -> AbstractContextManager:
        """Entered around the backbone's forward on ``inputs`` (e.g. per-input routing)."""

    def features(self, task: str, features: Any) -> Any:
        """``task``'s backbone output after the extension (e.g. a per-task feature correction)."""


@dataclass(frozen=True)
class ExportExtension:
    """An export extension.

    Args:
        key: the manifest entry the method writes (in its ``manifest_fields``) with the extension's settings and
            file names; its presence marks an export that needs the extension.
        module: the module that registers the extension (imported by ``load_merged`` when it is adamerge's own).
        serve: ``(export directory, manifest entry, backbone, dtype) -> NoHook`` (a :class:`ServingHook` module) for
        ``adamerge.load_merged``.
        card: the model card's paragraph for the export, from the manifest entry (say how to serve it).
        show_settings: list the manifest entry under the card's "Method settings".
    """

    key: str
    module: str
    serve: Callable[[Path, dict, nn.Module, torch.dtype], NoHook]
    card: Callable[[dict], str]
    show_settings: bool = True


EXTENSIONS: dict[str, ExportExtension] = {}


def register_extension(extension: ExportExtension) -> ExportExtension:
    """Add ``extension`` to the registry (again with the same key: replaced, e.g. a module reloaded)."""
    EXTENSIONS[extension.key] = extension
    return extension


def extensions_of(manifest: Mapping[str, Any]) -> list[ExportExtension]:
    """The extensions an export's manifest names, in its order; an unregistered one from adamerge's own modules is
    imported, any other is refused (importing a module named in a file would run code the user did not choose)."""
    if "extensions" not in manifest:  # written before exports recorded their extensions: adamerge's own, by key
        importlib.import_module("adamerge.parametrize")
        return [ext for key, ext in EXTENSIONS.items() if key in manifest and ext.module.startswith("adamerge.")]
    out = []
    for key, module in manifest["extensions"].items():
        if key not in EXTENSIONS and str(module).startswith("adamerge."):
            importlib.import_module(module)
        if key not in EXTENSIONS:
            raise MergeInputError(
                f"the export uses the extension {key!r} registered by module {module!r}, which is "
                "not imported: import it before loading the export"
            )
        out.append(EXTENSIONS[key])
    return out


class NoHook(nn.Module):
    """A :class:`ServingHook` that changes nothing: the base of serving hooks (a module, so that its tensors move with
    the served checkpoint)."""

    def context(self, inputs: Mapping[str, Tensor]) -> AbstractContextManager:
        return nullcontext()

    def features(self, task: str, features: Any) -> Any:
        return features
