"""Numeric formats: integer and small-float grids, scales, and the QuantSpec that combines them.

``QuantSpec.from_attributes`` reads ModelOpt quantizer attributes (``num_bits``, ``axis``,
``block_sizes``, ``unsigned``, ``narrow_range``); the spec does calibration statistics,
fake quantization with a straight-through gradient, and real quantization to codes and
scales, on CPU and CUDA alike, matching ModelOpt's numerics.
"""

from .floating import E0M3, E1M2, E2M1, E2M3, E3M0, E3M2, E4M3, E5M2, E8M0, FloatFormat
from .integer import IntFormat
from .packing import pack_nibbles, unpack_nibbles
from .spec import QuantSpec

__all__ = [
    "E0M3",
    "E1M2",
    "E2M1",
    "E2M3",
    "E3M0",
    "E3M2",
    "E4M3",
    "E5M2",
    "E8M0",
    "FloatFormat",
    "IntFormat",
    "QuantSpec",
    "pack_nibbles",
    "unpack_nibbles",
]
