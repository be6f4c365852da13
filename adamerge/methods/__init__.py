"""Method registry: name → MergeModule subclass. A new method adds its module and one line here."""

from __future__ import annotations

from adamerge.errors import MergeInputError
from adamerge.methods.adamerging import AdaMerging
from adamerge.methods.base import MergeModule, TaskVectorPrep
from adamerge.methods.concrete import ConcreteAdaMerging, ConcreteTaskArithmetic
from adamerge.methods.data_free import M3, TSVM, Average, IsoC, TaskArithmetic, Ties
from adamerge.methods.surgery import Surgery
from adamerge.methods.wemoe import WEMoE

METHODS: dict[str, type[MergeModule]] = {
    "average": Average,
    "task_arithmetic": TaskArithmetic,
    "ties": Ties,
    "m3": M3,
    "tsv_m": TSVM,
    "iso_c": IsoC,
    "adamerging": AdaMerging,
    "concrete_task_arithmetic": ConcreteTaskArithmetic,
    "concrete_adamerging": ConcreteAdaMerging,
    "surgery": Surgery,
    "wemoe": WEMoE,
}


def get_method(name: str) -> type[MergeModule]:
    if name not in METHODS:
        raise MergeInputError(f"method: unknown value {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "M3", "TSVM", "AdaMerging", "Average", "ConcreteAdaMerging", "ConcreteTaskArithmetic", "IsoC",
           "MergeModule", "Surgery", "TaskArithmetic", "TaskVectorPrep", "Ties", "WEMoE",
           "get_method"]
