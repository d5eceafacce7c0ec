"""Quantizer attributes: the settings of one quantizer, with ModelOpt's field names and defaults.

:class:`QuantizerAttributes` mirrors ModelOpt 0.47's ``QuantizerAttributeConfig``. Values are
checked when an instance is built (see :mod:`qpass.config.validate`); every error names the rule
key it came from and the values that would have been accepted.
"""

from __future__ import annotations

import copy
import functools
import dataclasses
from dataclasses import dataclass
from typing import Any

from qpass.errors import QuantConfigError

from .validate import check_values, where


@dataclass(eq=True)
class QuantizerAttributes:
    """The settings of one quantizer (a ``TensorQuantizer`` in ModelOpt terms).

    Field names, types and defaults follow ModelOpt's ``QuantizerAttributeConfig``:
    ``num_bits`` is an int (integer format) or an ``(E, M)`` tuple (floating point format);
    ``axis`` and ``block_sizes`` select per-channel and per-block scales and cannot be combined.
    """

    enable: bool = True
    num_bits: int | tuple[int, int] | str = 8
    effective_bits: float | None = None
    axis: int | tuple[int, ...] | None = None
    fake_quant: bool = True
    unsigned: bool = False
    narrow_range: bool = False
    learn_amax: bool = False
    type: str = "static"
    block_sizes: dict | None = None
    bias: dict | None = None
    trt_high_precision_dtype: str = "Float"
    calibrator: Any = "max"
    rotate: bool | dict = False
    pass_through_bwd: bool = True
    backend: str | None = None
    backend_extra_args: dict | None = None
    use_constant_amax: bool = False
    constant_amax: float | None = None

    def __post_init__(self):
        values = check_values(dataclasses.asdict(self), key=None)
        for name, value in values.items():
            setattr(self, name, value)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: dict, key: Any = None) -> QuantizerAttributes:
        """Build from a (possibly partial) attribute dict; missing attributes take defaults.

        ``key`` is the rule key the dict came from; it only serves the error messages.
        Lists are accepted where tuples are expected, and block-size axes may be numeric
        strings, so ``from_dict(json.loads(json.dumps(a.to_dict())))`` gives back ``a``.
        """
        if isinstance(d, QuantizerAttributes):
            return copy.deepcopy(d)
        if not isinstance(d, dict):
            raise QuantConfigError(
                f"{where(key)}quantizer attributes must be a dict, got {type(d).__name__}: {d!r}"
            )
        allowed = cls.field_names()
        for name in d:
            if name not in allowed:
                raise QuantConfigError(
                    f"{where(key)}unknown quantizer attribute {name!r}; "
                    f"allowed attributes: {', '.join(allowed)}"
                )
        values = {f.name: _copied(f.default) for f in _fields(cls)}
        values.update(copy.deepcopy(d))
        return cls(**check_values(values, key))

    def to_dict(self, exclude_defaults: bool = False) -> dict:
        """All attributes as a plain dict (tuples stay tuples); optionally only non-defaults."""
        out = {}
        for f in _fields(type(self)):
            value = getattr(self, f.name)
            if exclude_defaults and value == f.default:
                continue
            out[f.name] = _copied(value)
        return out

    def replace(self, **changes) -> QuantizerAttributes:
        """A validated copy with some attributes changed."""
        d = self.to_dict()
        d.update(changes)
        return type(self).from_dict(d)

    @property
    def is_dynamic_block(self) -> bool:
        return isinstance(self.block_sizes, dict) and self.block_sizes.get("type") == "dynamic"


__all__ = ["QuantizerAttributes"]


@functools.lru_cache(maxsize=None)
def _fields(cls) -> tuple:
    return dataclasses.fields(cls)


def _copied(value):
    """A deep copy of mutable attribute values (dicts, lists); immutable ones as they are
    (one quantizer per Linear: deep-copying every attribute cost most of its creation time)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple) and all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
        return value
    return copy.deepcopy(value)
