"""``max``: per-quantizer abs-max over the calibration data."""

from qpass.algorithms import register_algorithm
from qpass.calib.max_calibrate import max_calibrate
from qpass.errors import QuantConfigError


@register_algorithm("max")
def max_algorithm(model, state, forward_loop, distributed_sync=True, sync_expert_weight_amax=False,
                  skip_forward_without_activation_calib=False, shared_states=None):
    """ModelOpt 0.47's max options. ``skip_forward_without_activation_calib``: qpass never runs
    forward_loop when no enabled quantizer needs activation statistics, so both values give the
    same amax. ``shared_states``: qpass shares static NVFP4 weights' global amax within the
    shared-input groups the graph shows (q/k/v, gate/up: ModelOpt's default patterns); other
    patterns are refused."""
    for name, value in (("distributed_sync", distributed_sync), ("sync_expert_weight_amax", sync_expert_weight_amax),
                        ("skip_forward_without_activation_calib", skip_forward_without_activation_calib)):
        if not isinstance(value, bool):
            raise QuantConfigError(f"algorithm 'max': {name} must be True or False, got {value!r}")
    check_shared_states("max", shared_states)
    max_calibrate(model, state, forward_loop, sync_expert_weight_amax=sync_expert_weight_amax,
                  distributed_sync=distributed_sync)


def check_shared_states(method: str, shared_states) -> None:
    """ModelOpt 0.47's ``shared_states`` patterns: only the default (None) is implemented."""
    if shared_states is not None:
        raise QuantConfigError(
            f"algorithm {method!r}: shared_states={shared_states!r} is not implemented yet in qpass; it shares "
            "static NVFP4 weights' global amax within the shared-input groups of the graph (q/k/v, gate/up), "
            "ModelOpt's default; leave shared_states out")
