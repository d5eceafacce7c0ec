"""``max``: per-quantizer abs-max over the calibration data."""

import re

from qpass.algorithms import register_algorithm
from qpass.calib.max_calibrate import max_calibrate
from qpass.calib.nvfp4_static import pattern_groups
from qpass.errors import QuantConfigError

#: the shared quantization states ModelOpt 0.47's ``shared_states`` names, with their fields
SHARED_STATES = {"weight_global_amax": ("patterns",)}


@register_algorithm("max")
def max_algorithm(model, state, forward_loop, distributed_sync=True, sync_expert_weight_amax=False,
                  skip_forward_without_activation_calib=False, shared_states=None):
    """ModelOpt 0.47's max options. ``skip_forward_without_activation_calib``: qpass never runs
    forward_loop when no enabled quantizer needs activation statistics, so both values give the
    same amax. ``shared_states``: see :func:`shared_global_amax_groups`."""
    for name, value in (("distributed_sync", distributed_sync), ("sync_expert_weight_amax", sync_expert_weight_amax),
                        ("skip_forward_without_activation_calib", skip_forward_without_activation_calib)):
        if not isinstance(value, bool):
            raise QuantConfigError(f"algorithm 'max': {name} must be True or False, got {value!r}")
    groups = shared_global_amax_groups("max", model, shared_states)
    max_calibrate(model, state, forward_loop, sync_expert_weight_amax=sync_expert_weight_amax,
                  distributed_sync=distributed_sync, global_groups=groups)


def shared_global_amax_groups(method: str, model, shared_states) -> list[list[str]] | None:
    """The modules whose static NVFP4 weights share one global amax, from ModelOpt 0.47's
    ``shared_states={"weight_global_amax": {"patterns": [...]}}`` (max, mse, local_hessian).

    None (the option left out, or the state without ``patterns``): the default groups
    (:func:`qpass.calib.max_calibrate.global_amax_groups`). Otherwise each pattern is a regex matched
    in full against the name of every module with an enabled weight quantizer; modules whose match
    gives the same pattern and captured groups form one group (each module in its first matching
    pattern), as ModelOpt groups them:
    ``r"(.*)\\.(?:q_proj|k_proj)"`` puts the q and k projections of each attention block together.
    An empty list shares nothing. Checked before any work."""
    if shared_states is None:
        return None
    where = f"algorithm {method!r}: shared_states"
    if not isinstance(shared_states, dict):
        raise QuantConfigError(f"{where} must be a dict keyed by state name ({sorted(SHARED_STATES)}), "
                               f"got {type(shared_states).__name__}")
    unknown = sorted(set(shared_states) - set(SHARED_STATES))
    if unknown:
        raise QuantConfigError(f"{where} has unknown state(s) {unknown}; expected keys from {sorted(SHARED_STATES)}")
    cfg = shared_states.get("weight_global_amax", {})
    if not isinstance(cfg, dict) or set(cfg) - set(SHARED_STATES["weight_global_amax"]):
        raise QuantConfigError(f"{where}['weight_global_amax'] must be a dict with the field 'patterns' only, "
                               f"got {cfg!r}")
    if "patterns" not in cfg:
        return None
    patterns = cfg["patterns"]
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise QuantConfigError(f"{where}['weight_global_amax']['patterns'] must be a list of regex strings, "
                               f"got {patterns!r}")
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise QuantConfigError(f"{where}['weight_global_amax']['patterns'] has an invalid regex {p!r}: {e}") from e
    return pattern_groups(model, compiled, where)
