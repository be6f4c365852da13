"""Method registry: name → MergeModule subclass. A method is one module plus one registration here (or, outside the
package, one :func:`register_method` call)."""

from __future__ import annotations

from adamerge.errors import MergeInputError
from adamerge.io.extensions import register_extension
from adamerge.methods.adamerging import AdaMerging
from adamerge.methods.base import MergeModule
from adamerge.methods.concrete import ConcreteAdaMerging, ConcreteTaskArithmetic
from adamerge.methods.data_free import M3, TSVM, Average, IsoC, TaskArithmetic, Ties
from adamerge.methods.prep import TaskVectorPrep
from adamerge.methods.surgery import Surgery
from adamerge.methods.wemoe import WEMoE

METHODS: dict[str, type[MergeModule]] = {}


def register_method(cls: type[MergeModule]) -> type[MergeModule]:
    """Register ``cls`` under its ``method`` name (and its export extension, if it declares one); usable as a class
    decorator. ``adamerge fit``/``merge`` configs name a method by its class path (``class_path: my.module.MyMerge``).
    """
    if not isinstance(cls, type) or not issubclass(cls, MergeModule):
        raise MergeInputError(f"register_method: {cls!r} is not a MergeModule subclass")
    if cls.method in METHODS and METHODS[cls.method] is not cls:
        raise MergeInputError(f"register_method: the name {cls.method!r} is taken by {METHODS[cls.method].__name__}")
    METHODS[cls.method] = cls
    if cls.extension is not None:
        register_extension(cls.extension)
    return cls


for _cls in (
    Average,
    TaskArithmetic,
    Ties,
    M3,
    TSVM,
    IsoC,
    AdaMerging,
    ConcreteTaskArithmetic,
    ConcreteAdaMerging,
    Surgery,
    WEMoE,
):
    register_method(_cls)


def get_method(name: str) -> type[MergeModule]:
    if name not in METHODS:
        raise MergeInputError(f"method: unknown value {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = [
    "METHODS",
    "M3",
    "TSVM",
    "AdaMerging",
    "Average",
    "ConcreteAdaMerging",
    "ConcreteTaskArithmetic",
    "IsoC",
    "MergeModule",
    "Surgery",
    "TaskArithmetic",
    "TaskVectorPrep",
    "Ties",
    "WEMoE",
    "get_method",
    "register_method",
]
