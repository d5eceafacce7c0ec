"""Calibration algorithms, keyed by ModelOpt's method names.

Each entry is ``fn(model, state, forward_loop, **options)``: it reads statistics
through the graph and sets quantizer state (amax, pre_quant_scale). Register a
new algorithm with :func:`register_algorithm`; ``qpass.calibrate`` dispatches here.
"""

from __future__ import annotations

from typing import Callable

ALGORITHMS: dict[str, Callable] = {}


def register_algorithm(name: str):
    def deco(fn):
        ALGORITHMS[name] = fn
        return fn

    return deco


def get_algorithm(name: str) -> Callable:
    from qpass.errors import QuantConfigError

    _load_builtin()
    if name not in ALGORITHMS:
        raise QuantConfigError(
            f"calibration algorithm {name!r} is not implemented yet in qpass; implemented: {sorted(ALGORITHMS)}"
        )
    return ALGORITHMS[name]


def _load_builtin() -> None:
    # Imported lazily: algorithm modules import the model machinery.
    from qpass.algorithms import max as _max  # noqa: F401
    from qpass.algorithms import mse as _mse  # noqa: F401
    from qpass.algorithms import local_hessian as _local_hessian  # noqa: F401
    from qpass.algorithms import smoothquant as _smoothquant  # noqa: F401
    from qpass.algorithms import awq as _awq  # noqa: F401
    from qpass.algorithms import svdquant as _svdquant  # noqa: F401
    from qpass.algorithms import gptq as _gptq  # noqa: F401
    from qpass.algorithms import real_quantize as _real_quantize  # noqa: F401
