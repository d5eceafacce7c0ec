"""``max``: per-quantizer abs-max over the calibration data."""

from qpass.algorithms import register_algorithm
from qpass.calib.max_calibrate import max_calibrate


@register_algorithm("max")
def max_algorithm(model, state, forward_loop, **options):
    max_calibrate(model, state, forward_loop)
