"""Checking ModelOpt quantizer attributes, with errors that say what would be right.

The rules follow ModelOpt 0.47's ``QuantizerAttributeConfig`` and what its quantizer can
run, with two qpass choices: integers are limited to 2..8 bits, and E5M2 is also accepted
outside dynamic blocks (scaled like E4M3 with max 57344; ModelOpt rejects it there).
"""

from __future__ import annotations

from qpass.errors import QuantConfigError

__all__ = ["parse_attributes"]

STATIC_FLOATS = {(4, 3): "E4M3", (5, 2): "E5M2"}
DYNAMIC_ELEMENTS = {
    (4, 3): "E4M3",
    (5, 2): "E5M2",
    (3, 2): "E3M2",
    (2, 3): "E2M3",
    (2, 1): "E2M1",
    (1, 2): "E1M2",
    (0, 3): "E0M3",
    (3, 0): "E3M0",
}
SCALE_BITS = {**DYNAMIC_ELEMENTS, (8, 0): "E8M0"}
BLOCK_STRING_KEYS = ("type", "scale_bits", "scale_block_sizes", "four_over_six")
NVFP4_EXAMPLE = "{-1: 16, 'type': 'dynamic', 'scale_bits': (4, 3)}"
STATIC_NVFP4_EXAMPLE = "{-1: 16, 'type': 'static', 'scale_bits': (4, 3)}"
MX_EXAMPLE = "{-1: 32, 'type': 'dynamic', 'scale_bits': (8, 0)}"


def _pair(v, what):
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(i) for i in v):
        return (int(v[0]), int(v[1]))
    return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num_bits(num_bits):
    if _is_int(num_bits):
        if not 2 <= num_bits <= 8:
            raise QuantConfigError(
                f"num_bits={num_bits!r} is not supported: integer formats take 2..8 bits; "
                f"use a tuple (E, M) such as (4, 3) for floating point"
            )
        return num_bits
    pair = _pair(num_bits, "num_bits")
    if pair is None:
        raise QuantConfigError(
            f"num_bits={num_bits!r} is not valid: use an int in 2..8 or an (E, M) tuple, one of "
            f"{sorted(DYNAMIC_ELEMENTS)}"
        )
    if pair not in DYNAMIC_ELEMENTS:
        raise QuantConfigError(
            f"num_bits={pair} is not a supported float format; allowed (E, M): "
            + ", ".join(f"{k} ({v})" for k, v in DYNAMIC_ELEMENTS.items())
        )
    return pair


def _axis(axis):
    if axis is None or _is_int(axis):
        return axis
    if isinstance(axis, (list, tuple)) and axis and all(_is_int(a) for a in axis):
        return tuple(axis)
    raise QuantConfigError(f"axis={axis!r} is not valid: use None, an int, or a tuple of ints (axes kept)")


def _block_sizes(bs):
    if not isinstance(bs, dict):
        raise QuantConfigError(f"block_sizes={bs!r} is not valid: use a dict such as {{-1: 128, 'type': 'static'}}")
    axes, extra = {}, {}
    for k, v in bs.items():
        if isinstance(k, str):
            if k not in BLOCK_STRING_KEYS:
                raise QuantConfigError(
                    f"block_sizes key {k!r} is not valid; string keys allowed: {list(BLOCK_STRING_KEYS)}"
                )
            extra[k] = v
        elif _is_int(k):
            if v is not None and not (_is_int(v) and v > 0):
                raise QuantConfigError(
                    f"block_sizes[{k}]={v!r} is not valid: a block size is a positive int or None"
                )
            axes[k] = v
        else:
            raise QuantConfigError(f"block_sizes key {k!r} is not valid: use int axes and {list(BLOCK_STRING_KEYS)}")
    if not axes:
        raise QuantConfigError(f"block_sizes={bs!r} names no axis; add e.g. -1: 128")
    kind = extra.get("type", "static")
    if kind not in ("static", "dynamic"):
        raise QuantConfigError(f"block_sizes type={kind!r} is not valid; allowed: 'static', 'dynamic'")
    return axes, kind, extra


def parse_attributes(num_bits, axis, block_sizes, unsigned, narrow_range) -> dict:
    """Normalize and check attributes; returns num_bits, axis, block_sizes, dynamic_block,
    scale_bits, unsigned, narrow_range."""
    nb = _num_bits(num_bits)
    axis = _axis(axis)
    out = dict(num_bits=nb, axis=axis, block_sizes=None, dynamic_block=None, scale_bits=None,
               scale_norm=None, unsigned=bool(unsigned), narrow_range=bool(narrow_range))
    is_float = isinstance(nb, tuple)
    if is_float and unsigned:
        raise QuantConfigError(f"unsigned=True applies to integer formats only, not num_bits={nb}")
    if block_sizes is None:
        if is_float and nb not in STATIC_FLOATS:
            raise QuantConfigError(_needs_dynamic(nb))
        return out
    if axis is not None:
        raise QuantConfigError(
            f"axis={axis!r} and block_sizes={block_sizes!r} cannot both be set: use axis for "
            f"per-channel scales or block_sizes for block scales"
        )
    axes, kind, extra = _block_sizes(block_sizes)
    if extra.get("scale_block_sizes") is not None:
        raise QuantConfigError("block_sizes scale_block_sizes (double-quantized block scales) is not supported by qpass")
    static_nvfp4 = kind == "static" and nb == (2, 1) and _pair(extra.get("scale_bits"), "scale_bits") == (4, 3)
    if extra.get("four_over_six") and not static_nvfp4:
        raise QuantConfigError(
            f"block_sizes four_over_six applies to static NVFP4 weights only ({STATIC_NVFP4_EXAMPLE} "
            f"with num_bits=(2, 1)), got num_bits={nb} and block_sizes={block_sizes!r}"
        )
    if static_nvfp4:
        if set(axes) != {-1} or axes[-1] is None:
            raise QuantConfigError(
                f"static NVFP4 takes one int block size on the last axis, e.g. {STATIC_NVFP4_EXAMPLE}; "
                f"got block_sizes={block_sizes!r}"
            )
        # per-block E4M3 scales normalised to 448, or to 256 for four-over-six, whose MSE search
        # may raise a block's amax to 1.5x the global amax (1.5 * 256 = 384 stays below 448)
        out.update(block_sizes=axes, scale_bits=(4, 3), scale_norm=256.0 if extra.get("four_over_six") else 448.0)
        return out
    if kind == "static" or all(v is None for v in axes.values()):
        if "scale_bits" in extra and extra["scale_bits"] is not None:
            raise QuantConfigError(
                f"scale_bits={extra['scale_bits']!r} with static blocks is supported for NVFP4 only "
                f"(num_bits=(2, 1), scale_bits=(4, 3), e.g. {STATIC_NVFP4_EXAMPLE}); otherwise use "
                f"type 'dynamic', e.g. NVFP4 block_sizes={NVFP4_EXAMPLE}"
            )
        if is_float and nb not in STATIC_FLOATS:
            raise QuantConfigError(_needs_dynamic(nb))
        out["block_sizes"] = axes
        return out
    return _dynamic(out, nb, axes, extra)


def _dynamic(out, nb, axes, extra):
    if len(axes) != 1:
        raise QuantConfigError(
            f"dynamic block quantization takes exactly one axis (the last), got axes {sorted(axes)}"
        )
    (key, size), = axes.items()
    if key < 0 and key != -1:
        raise QuantConfigError(f"dynamic block quantization runs along the last axis (-1), not axis {key}")
    if size is None:
        raise QuantConfigError("dynamic block quantization needs an int block size, e.g. {-1: 16}")
    if isinstance(nb, int) and nb != 8:
        raise QuantConfigError(
            f"num_bits={nb} is not supported with dynamic blocks; integers allow only 8 (MXINT8)"
        )
    if out["unsigned"]:
        raise QuantConfigError("unsigned=True is not supported with dynamic block quantization")
    sb = extra.get("scale_bits")
    pair = _pair(sb, "scale_bits") if sb is not None else None
    if pair is None or pair not in SCALE_BITS:
        raise QuantConfigError(
            f"dynamic block quantization needs scale_bits as (E, M), one of {sorted(SCALE_BITS)}, "
            f"got {sb!r}; e.g. NVFP4 {NVFP4_EXAMPLE} or MX {MX_EXAMPLE}"
        )
    out.update(dynamic_block=(key, size), scale_bits=pair)
    return out


def _needs_dynamic(nb) -> str:
    return (
        f"num_bits={nb} ({DYNAMIC_ELEMENTS[nb]}) is only supported with dynamic block "
        f"quantization (per-tensor / per-channel / static-block floats: {sorted(STATIC_FLOATS)}); "
        f"e.g. block_sizes={NVFP4_EXAMPLE if nb == (2, 1) else MX_EXAMPLE}"
    )
