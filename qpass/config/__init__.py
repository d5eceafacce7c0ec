"""Quantization configs: presets, quantizer attributes, rules and their resolution.

API-compatible with ``modelopt.torch.quantization.config`` (ModelOpt 0.47)::

    import qpass.config as qc
    rules, algorithm = qc.normalize_config("INT8_DEFAULT_CFG")
    attrs = qc.resolve_attributes(rules, "layers.0.fc1.weight_quantizer", model.layers[0].fc1)
"""

from . import presets as _presets
from .algorithms import ALGORITHM_OPTIONS, ALGORITHMS, QPASS_OPTIONS, normalize_algorithm
from .attributes import QuantizerAttributes
from .normalize import normalize_config, normalize_quant_cfg
from .presets import choices, get_preset
from .rules import (
    Rule,
    apply_rule,
    default_attributes,
    pattern_matches,
    resolve_attributes,
    rule_matches,
)

globals().update({name: getattr(_presets, name) for name in choices})
INT8_ASYMMETRIC_CFG = _presets.INT8_ASYMMETRIC_CFG  # qpass's own preset (not in choices)

__all__ = [
    "ALGORITHMS",
    "ALGORITHM_OPTIONS",
    "INT8_ASYMMETRIC_CFG",
    "QPASS_OPTIONS",
    "QuantizerAttributes",
    "Rule",
    "apply_rule",
    "choices",
    "default_attributes",
    "get_preset",
    "normalize_algorithm",
    "normalize_config",
    "normalize_quant_cfg",
    "pattern_matches",
    "resolve_attributes",
    "rule_matches",
    *sorted(choices),
]
