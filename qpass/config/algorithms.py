"""Calibration algorithm names and their options, as ModelOpt 0.47's ``mtq.calibrate`` accepts them."""

from __future__ import annotations

import copy
import difflib

from qpass.errors import QuantConfigError

# Options every algorithm takes.
_COMMON = ("moe_calib_experts_ratio", "layerwise")
_SHARED_STATES = ("shared_states",)
_AWQ_CLIP = ("max_co_batch_size", "max_tokens_per_batch", "min_clip_ratio", "shrink_step", "debug")
_AMAX_SEARCH = ("step_size", "start_multiplier", "stop_multiplier", "fp8_scale_sweep")

#: Every calibration method name ModelOpt 0.47 registers, with the keyword options it takes.
ALGORITHM_OPTIONS: dict[str, tuple[str, ...]] = {
    "max": _SHARED_STATES
    + ("distributed_sync", "sync_expert_weight_amax", "skip_forward_without_activation_calib"),
    "mse": _SHARED_STATES + _AMAX_SEARCH + ("distributed_sync",),
    "local_hessian": _SHARED_STATES + _AMAX_SEARCH + ("block_size", "distributed_sync", "debug"),
    "smoothquant": ("alpha",),
    "awq_lite": ("alpha_step", "debug"),
    "awq_clip": _AWQ_CLIP,
    "awq_full": _AWQ_CLIP + ("alpha_step",),
    "svdquant": ("lowrank", "skip_layers"),
    "gptq": ("perc_damp", "block_size", "fused"),
    "nvfp4_act_headroom": ("anchor_percentile", "upper_percentile", "rho", "weight_scale_algorithm"),
    "lsq": ("learnable_amax", "tied_amax", "quantize_pre_scale", "scale_algorithm"),
}

ALGORITHMS: tuple[str, ...] = tuple(ALGORITHM_OPTIONS)


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
        if algorithm not in ALGORITHM_OPTIONS:
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
        if not isinstance(method, str) or method not in ALGORITHM_OPTIONS:
            raise _unknown_method(method, f"{where}['method']")
        allowed = _COMMON + ALGORITHM_OPTIONS[method]
        for k in options:
            if k not in allowed:
                raise QuantConfigError(
                    f"{where}: unknown option {k!r} for algorithm {method!r}; "
                    f"allowed options: {', '.join(allowed)}"
                )
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
