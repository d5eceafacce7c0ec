"""Calibration algorithm names and their options, as ModelOpt 0.47's ``mtq.calibrate`` accepts them."""

from __future__ import annotations

import copy
import difflib

from qpass.errors import QuantConfigError

# Options every algorithm takes.
_COMMON = ("moe_calib_experts_ratio", "layerwise")
_SHARED_STATES = ("shared_states",)
_AWQ_CLIP = ("max_co_batch_size", "max_tokens_per_batch", "min_clip_ratio", "shrink_step", "debug")
#: qpass's own options, not in ModelOpt 0.47: GPTQ rounding of the smoothed weights (on by default
#: for AWQ, off for SmoothQuant) and GPTQ's column order (act_order, on by default)
_QPASS_AWQ = ("gptq",)
QPASS_OPTIONS: dict[str, tuple[str, ...]] = {
    "awq_lite": _QPASS_AWQ, "awq_clip": _QPASS_AWQ, "awq_full": _QPASS_AWQ, "smoothquant": _QPASS_AWQ, "svdquant": _QPASS_AWQ,
    "gptq": ("act_order",),
}
_AMAX_SEARCH = ("step_size", "start_multiplier", "stop_multiplier", "fp8_scale_sweep")

#: Every calibration method name ModelOpt 0.47 registers, with the keyword options it takes
#: (and qpass's own, :data:`QPASS_OPTIONS`).
ALGORITHM_OPTIONS: dict[str, tuple[str, ...]] = {
    "max": _SHARED_STATES
    + ("distributed_sync", "sync_expert_weight_amax", "skip_forward_without_activation_calib"),
    "mse": _SHARED_STATES + _AMAX_SEARCH + ("distributed_sync",),
    "local_hessian": _SHARED_STATES + _AMAX_SEARCH + ("block_size", "distributed_sync", "debug"),
    "smoothquant": ("alpha",) + _QPASS_AWQ,
    "awq_lite": ("alpha_step", "debug") + _QPASS_AWQ,
    "awq_clip": _AWQ_CLIP + _QPASS_AWQ,
    "awq_full": _AWQ_CLIP + ("alpha_step",) + _QPASS_AWQ,
    "svdquant": ("lowrank", "skip_layers") + _QPASS_AWQ,
    "gptq": ("perc_damp", "block_size", "fused", "act_order"),
    "nvfp4_act_headroom": ("anchor_percentile", "upper_percentile", "rho", "weight_scale_algorithm"),
    "lsq": ("learnable_amax", "tied_amax", "quantize_pre_scale", "scale_algorithm"),
}

#: Not calibration methods in ModelOpt 0.47. ``real_quantize`` (0.47: ``mtq.compress``) is the
#: algorithm form of earlier ModelOpt releases: calibrate with additional_algorithm, then pack.
EXTRA_ALGORITHM_OPTIONS: dict[str, tuple[str, ...]] = {"real_quantize": ("additional_algorithm",)}

_OPTIONS = {**ALGORITHM_OPTIONS, **EXTRA_ALGORITHM_OPTIONS}
ALGORITHMS: tuple[str, ...] = tuple(_OPTIONS)


def _unknown_method(method, where) -> QuantConfigError:
    close = difflib.get_close_matches(str(method), ALGORITHMS, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return QuantConfigError(
        f"{where}: unknown calibration algorithm {method!r}{hint}; "
        f"allowed: {', '.join(ALGORITHMS)}, or None for no calibration"
    )


def normalize_algorithm(algorithm, where: str = "algorithm"):
    """Return ``{"method": name, **options}``, ``None`` (no calibration), or a list of those.

    Accepts a method name, a dict with a ``"method"`` key and options, ``None``, or a list of
    these (ModelOpt runs a list of algorithms one after the other).
    """
    if algorithm is None:
        return None
    if isinstance(algorithm, str):
        if algorithm not in _OPTIONS:
            raise _unknown_method(algorithm, where)
        return {"method": algorithm}
    if isinstance(algorithm, dict):
        if "method" not in algorithm:
            raise QuantConfigError(
                f"{where}: a dict algorithm needs a 'method' key naming one of "
                f"{', '.join(ALGORITHMS)}; got keys {sorted(map(str, algorithm))}"
            )
        method = algorithm["method"]
        options = {k: copy.deepcopy(v) for k, v in algorithm.items() if k != "method"}
        if method is None:
            bad = [k for k in options if k not in _COMMON]
            if bad:
                raise QuantConfigError(
                    f"{where}: method None (no calibration) takes no options, got {bad}"
                )
            return None
        if not isinstance(method, str) or method not in _OPTIONS:
            raise _unknown_method(method, f"{where}['method']")
        allowed = _COMMON + _OPTIONS[method]
        for k in options:
            if k not in allowed:
                raise QuantConfigError(
                    f"{where}: unknown option {k!r} for algorithm {method!r}; "
                    f"allowed options: {', '.join(allowed)}"
                )
        from qpass.calib.moe_ratio import OPTION, check_ratio

        check_ratio(options.get(OPTION), where)
        if method == "gptq":
            check_gptq_options(options, where)
        if method == "real_quantize":
            options = _real_quantize_options(options, where)
        return {"method": method, **options}
    if isinstance(algorithm, (list, tuple)):
        out = []
        for i, item in enumerate(algorithm):
            if isinstance(item, (list, tuple)):
                raise QuantConfigError(f"{where}[{i}]: nested lists of algorithms are not allowed")
            out.append(normalize_algorithm(item, f"{where}[{i}]"))
        return out
    raise QuantConfigError(
        f"{where}: must be a method name, a dict with 'method', None, or a list of these; "
        f"got {type(algorithm).__name__}: {algorithm!r}"
    )


def _layerwise_enabled(value, where: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"enable", "get_qdq_activations_from_prev_layer"})
        if unknown:
            raise QuantConfigError(f"{where}: layerwise options {unknown} are not implemented yet in qpass; "
                                   "implemented: enable, get_qdq_activations_from_prev_layer=True")
        if value.get("get_qdq_activations_from_prev_layer", True) is not True:
            raise QuantConfigError(f"{where}: layerwise get_qdq_activations_from_prev_layer=False is not "
                                   "implemented yet in qpass for gptq (each layer sees the quantized layers before it)")
        return bool(value.get("enable", False))
    raise QuantConfigError(f"{where}: layerwise must be a bool or a dict like {{'enable': True}}, got {value!r}")


def check_gptq_options(options: dict, where: str = "gptq") -> dict:
    """GPTQ's option values (ModelOpt 0.47's ranges); returns them with defaults filled in."""
    perc_damp = options.get("perc_damp", 0.01)
    if isinstance(perc_damp, bool) or not isinstance(perc_damp, (int, float)) or not 0.0 < perc_damp <= 1.0:
        raise QuantConfigError(f"{where}: perc_damp must be a number in (0, 1] (default 0.01), got {perc_damp!r}")
    block_size = options.get("block_size", 128)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise QuantConfigError(
            f"{where}: block_size must be a positive integer, a multiple of the weight block size "
            f"(default 128), got {block_size!r}"
        )
    fused = options.get("fused", False)
    if not isinstance(fused, bool):
        raise QuantConfigError(f"{where}: fused must be True or False, got {fused!r}")
    act_order = options.get("act_order", True)
    if not isinstance(act_order, bool):
        raise QuantConfigError(f"{where}: act_order must be True or False (default True), got {act_order!r}")
    return {"perc_damp": float(perc_damp), "block_size": block_size, "fused": fused, "act_order": act_order,
            "layerwise": _layerwise_enabled(options.get("layerwise"), where)}


def _real_quantize_options(options: dict, where: str) -> dict:
    extra = sorted(k for k in options if k != "additional_algorithm")
    if extra:
        raise QuantConfigError(f"{where}: real_quantize takes only 'additional_algorithm', got {extra}")
    inner = options.get("additional_algorithm", "max")
    if isinstance(inner, (list, tuple)):
        raise QuantConfigError(f"{where}: additional_algorithm must be one algorithm (a name or a dict), not a list")
    inner = normalize_algorithm(inner, f"{where}['additional_algorithm']")
    if inner is not None and inner["method"] == "real_quantize":
        raise QuantConfigError(f"{where}: additional_algorithm cannot itself be real_quantize")
    return {"additional_algorithm": inner}
