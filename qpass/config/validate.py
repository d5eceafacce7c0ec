"""Checks of quantizer attribute values, with messages that name the rule key and allowed values.

The rules follow ModelOpt 0.47's ``QuantizerAttributeConfig`` validators, a little stricter where
ModelOpt accepts a value it cannot use (see ``tests/config/test_attributes.py``).
"""

from __future__ import annotations

from qpass.errors import QuantConfigError

# (exponent, mantissa) pairs usable anywhere: FP8 E4M3 and FP4 E2M1.
FP_FORMATS_ANY = ((4, 3), (2, 1))
# Pairs that ModelOpt accepts only with dynamic block quantization (MX formats, FP6, FP8 E5M2, ...).
FP_FORMATS_DYNAMIC_BLOCK = ((5, 2), (1, 2), (3, 2), (2, 3))
BLOCK_SIZES_STR_KEYS = ("type", "scale_bits", "scale_block_sizes", "four_over_six")
QUANT_TYPES = ("static", "dynamic")
BIAS_TYPES = ("static", "dynamic")
BIAS_METHODS = ("mean", "max_min", "histogram")  # histogram: qpass's own (zero_point)
TRT_DTYPES = ("Float", "Half", "BFloat16")
CALIBRATORS = ("max", "histogram")
ROTATE_KEYS = ("enable", "mode", "rotate_fp32", "block_size")
ROTATE_MODES = ("rotate", "rotate_back")


def where(key) -> str:
    if key is None:
        return ""
    return f"{key if isinstance(key, str) else repr(key)}: "


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fail(key, attr, msg):
    raise QuantConfigError(f"{where(key)}attribute {attr!r} {msg}")


def _check_bool(values, key, attr):
    if not isinstance(values[attr], bool):
        _fail(key, attr, f"must be True or False, got {values[attr]!r}")


def _check_num_bits(v, key, backend, block_sizes):
    if isinstance(v, list):
        v = tuple(v)
    if backend is not None:
        # Custom backends interpret num_bits themselves (ModelOpt skips the check too).
        if not (_is_int(v) or isinstance(v, str) or isinstance(v, tuple)):
            _fail(key, "num_bits", f"must be an int, an (E, M) tuple or a string, got {v!r}")
        return v
    allowed = (
        "a positive int (integer format), or an (E, M) tuple from "
        f"{list(FP_FORMATS_ANY)}, or with dynamic block quantization also "
        f"{list(FP_FORMATS_DYNAMIC_BLOCK)}; a string needs a custom 'backend'"
    )
    if _is_int(v):
        if v < 1:
            _fail(key, "num_bits", f"must be {allowed}; got {v!r}")
        return v
    if not (isinstance(v, tuple) and len(v) == 2 and all(_is_int(x) for x in v)):
        _fail(key, "num_bits", f"must be {allowed}; got {v!r}")
    if v in FP_FORMATS_ANY:
        return v
    dynamic = isinstance(block_sizes, dict) and block_sizes.get("type") == "dynamic"
    if v in FP_FORMATS_DYNAMIC_BLOCK:
        if dynamic:
            return v
        _fail(
            key,
            "num_bits",
            f"{v!r} (E{v[0]}M{v[1]}) is only supported with dynamic block quantization "
            f"(block_sizes={{-1: N, 'type': 'dynamic', ...}}); without it use one of "
            f"{list(FP_FORMATS_ANY)} or an int",
        )
    _fail(key, "num_bits", f"must be {allowed}; got {v!r}")


def _check_axis(v, key):
    if v is None or _is_int(v):
        return v
    if isinstance(v, (list, tuple)) and all(_is_int(x) for x in v):
        return tuple(v)
    _fail(key, "axis", f"must be None, an int or a tuple of ints, got {v!r}")


def _int_key(k):
    """Block/bias axes: ints, or numeric strings (what JSON makes of int keys)."""
    if _is_int(k):
        return k
    if isinstance(k, str):
        try:
            return int(k)
        except ValueError:
            return None
    return None


def _check_block_sizes(v, key, axis):
    if v is None:
        return None
    allowed_keys = f"int axes or one of {list(BLOCK_SIZES_STR_KEYS)}"
    if not isinstance(v, dict):
        _fail(key, "block_sizes", f"must be None or a dict with keys {allowed_keys}, got {v!r}")
    if axis is not None:
        _fail(
            key,
            "block_sizes",
            f"cannot be combined with 'axis' (got axis={axis!r}); set axis=None for block "
            "quantization, or drop block_sizes for per-channel quantization",
        )
    out = {}
    for k, val in v.items():
        if k in BLOCK_SIZES_STR_KEYS:
            out[k] = _check_block_special(k, val, key)
            continue
        ik = _int_key(k)
        if ik is None:
            _fail(key, "block_sizes", f"has key {k!r}; keys must be {allowed_keys}")
        if not (val is None or (_is_int(val) and val > 0)):
            _fail(key, "block_sizes", f"[{ik}] must be a positive int or None, got {val!r}")
        out[ik] = val
    if out.get("type") == "dynamic":
        axes = [k for k in out if not isinstance(k, str)]
        if len(axes) != 1:
            _fail(
                key,
                "block_sizes",
                f"with type 'dynamic' needs exactly one block axis (the last), got {axes}",
            )
    return out


def _check_block_special(k, val, key):
    if k == "type":
        if val not in QUANT_TYPES:
            _fail(key, "block_sizes", f"['type'] must be one of {list(QUANT_TYPES)}, got {val!r}")
        return val
    if k == "scale_bits":
        if isinstance(val, list):
            val = tuple(val)
        ok = _is_int(val) or (isinstance(val, tuple) and len(val) == 2 and all(map(_is_int, val)))
        if not ok:
            _fail(key, "block_sizes", f"['scale_bits'] must be an int or (E, M) tuple, got {val!r}")
        return val
    if k == "scale_block_sizes":
        if val is None:
            return None
        if not isinstance(val, dict):
            _fail(key, "block_sizes", f"['scale_block_sizes'] must be a dict {{axis: size}}, got {val!r}")
        out = {}
        for a, s in val.items():
            ia = _int_key(a)
            if ia is None or not _is_int(s):
                _fail(key, "block_sizes", f"['scale_block_sizes'] must map int axes to ints, got {val!r}")
            out[ia] = s
        return out
    # four_over_six: a flag ModelOpt stores as given (1 in its NVFP4_FOUR_OVER_SIX preset).
    if not (_is_number(val) or isinstance(val, bool)):
        _fail(key, "block_sizes", f"['four_over_six'] must be a bool or number, got {val!r}")
    return val


def _check_bias(v, key):
    if v is None:
        return None
    if not isinstance(v, dict):
        _fail(key, "bias", f"must be None or a dict, got {v!r}")
    out = {}
    for k, val in v.items():
        if k == "type":
            if val not in BIAS_TYPES:
                _fail(key, "bias", f"['type'] must be one of {list(BIAS_TYPES)}, got {val!r}")
            out[k] = val
        elif k == "method":
            if val not in BIAS_METHODS:
                _fail(key, "bias", f"['method'] must be one of {list(BIAS_METHODS)}, got {val!r}")
            out[k] = val
        elif k == "zero_point":  # qpass's own: a static integer bias rounded to whole steps
            if not isinstance(val, bool):
                _fail(key, "bias", f"['zero_point'] must be True or False, got {val!r}")
            out[k] = val
        else:
            ik = _int_key(k)
            if ik is None:
                _fail(key, "bias", f"has key {k!r}; keys must be int axes, 'type', 'method' or 'zero_point'")
            out[ik] = tuple(val) if isinstance(val, list) else val
    if not any(not isinstance(k, str) for k in out):
        _fail(key, "bias", f"must name at least one int axis for the bias, got {v!r}")
    if out.get("method") == "histogram" and (not out.get("zero_point") or out.get("type", "static") != "static"):
        _fail(key, "bias", "['method'] 'histogram' (qpass's range search) needs 'zero_point': True and "
              f"'type': 'static', got {v!r}")
    return out


def _check_calibrator(v, key):
    if isinstance(v, str):
        if v not in CALIBRATORS:
            _fail(key, "calibrator", f"must be one of {list(CALIBRATORS)} or a calibrator class, got {v!r}")
        return v
    if callable(v):
        return v
    if isinstance(v, (tuple, list)) and v and callable(v[0]):
        return tuple(v)
    if isinstance(v, dict) and callable(v.get("class")):
        return v
    _fail(key, "calibrator", f"must be one of {list(CALIBRATORS)} or a calibrator class, got {v!r}")


def _check_rotate(v, key):
    if isinstance(v, bool):
        return v
    if not isinstance(v, dict):
        _fail(key, "rotate", f"must be a bool or a dict with keys {list(ROTATE_KEYS)}, got {v!r}")
    for k in v:
        if k not in ROTATE_KEYS:
            _fail(key, "rotate", f"has unknown key {k!r}; allowed keys: {list(ROTATE_KEYS)}")
    out = {"enable": False, "mode": "rotate", "rotate_fp32": False, "block_size": None}
    out.update(v)
    for k in ("enable", "rotate_fp32"):
        if not isinstance(out[k], bool):
            _fail(key, "rotate", f"[{k!r}] must be True or False, got {out[k]!r}")
    if out["mode"] not in ROTATE_MODES:
        _fail(key, "rotate", f"['mode'] must be one of {list(ROTATE_MODES)}, got {out['mode']!r}")
    bs = out["block_size"]
    if bs is not None and not (_is_int(bs) and bs > 0):
        _fail(key, "rotate", f"['block_size'] must be a positive int or None, got {bs!r}")
    return out


def check_values(values: dict, key) -> dict:
    """Validate a full attribute dict and return it normalised (lists to tuples, int axes)."""
    v = dict(values)
    for attr in ("enable", "fake_quant", "unsigned", "narrow_range", "pass_through_bwd",
                 "use_constant_amax"):
        _check_bool(v, key, attr)
    if v["learn_amax"] is not False:
        _fail(key, "learn_amax", "is deprecated in ModelOpt and must stay False")
    if v["type"] not in QUANT_TYPES:
        _fail(key, "type", f"must be one of {list(QUANT_TYPES)}, got {v['type']!r}")
    if v["trt_high_precision_dtype"] not in TRT_DTYPES:
        _fail(key, "trt_high_precision_dtype", f"must be one of {list(TRT_DTYPES)}, got {v['trt_high_precision_dtype']!r}")
    if v["backend"] is not None and not isinstance(v["backend"], str):
        _fail(key, "backend", f"must be None or a backend name (str), got {v['backend']!r}")
    if v["backend_extra_args"] is not None and not isinstance(v["backend_extra_args"], dict):
        _fail(key, "backend_extra_args", f"must be None or a dict, got {v['backend_extra_args']!r}")
    eb = v["effective_bits"]
    if eb is not None and not (_is_number(eb) and 0 < eb <= 16):
        _fail(key, "effective_bits", f"must be None or a number in (0, 16], got {eb!r}")
    ca = v["constant_amax"]
    if ca is not None and not (_is_number(ca) and ca > 0):
        _fail(key, "constant_amax", f"must be None or a positive number, got {ca!r}")
    if v["use_constant_amax"] and ca is not None:
        _fail(key, "constant_amax", "cannot be set together with use_constant_amax=True; set only one")
    v["axis"] = _check_axis(v["axis"], key)
    v["block_sizes"] = _check_block_sizes(v["block_sizes"], key, v["axis"])
    v["num_bits"] = _check_num_bits(v["num_bits"], key, v["backend"], v["block_sizes"])
    v["bias"] = _check_bias(v["bias"], key)
    v["calibrator"] = _check_calibrator(v["calibrator"], key)
    v["rotate"] = _check_rotate(v["rotate"], key)
    return v
