"""The 39 quantization presets of ModelOpt 0.47, built from shared pieces.

Each preset is a dict ``{"quant_cfg": [entries...], "algorithm": ...}`` in ModelOpt's list form
and equals ModelOpt's preset of the same name. Most presets read: switch every quantizer off,
configure weights and inputs, then switch off the layers that should stay in high precision
(:data:`_DEFAULT_DISABLED`). The KV-cache presets have no ``"algorithm"`` key: they are meant to
be appended to a model preset.
"""

from __future__ import annotations

import copy
import difflib

from qpass.errors import QuantConfigError

# --------------------------------------------------------------------------------------------
# Entry builders


def _on(name: str, cfg, parent_class: str | None = None) -> dict:
    """Configure (and enable) the quantizers matching ``name``."""
    entry = {"quantizer_name": name}
    if parent_class:
        entry["parent_class"] = parent_class
    entry["cfg"] = cfg
    return entry


def _off(name: str, parent_class: str | None = None) -> dict:
    """Switch off the quantizers matching ``name``, leaving their attributes as they are."""
    entry = {"quantizer_name": name}
    if parent_class:
        entry["parent_class"] = parent_class
    entry["enable"] = False
    return entry


def _weights_and_inputs(cfg, prefixes=("*",)) -> list[dict]:
    """Weight and input quantizers of the modules under each prefix get ``cfg``."""
    out = []
    for p in prefixes:
        out += [_on(f"{p}weight_quantizer", cfg), _on(f"{p}input_quantizer", cfg)]
    return out


# --------------------------------------------------------------------------------------------
# Number formats (quantizer attribute dicts)

FP8 = (4, 3)  # E4M3
FP4 = (2, 1)  # E2M1
FP6 = (3, 2)  # E3M2
E8M0 = (8, 0)  # power-of-two scale of the MX formats

INT8_PER_CHANNEL = {"num_bits": 8, "axis": 0}
INT8_PER_TENSOR = {"num_bits": 8, "axis": None}
INT4_BLOCK128 = {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}}
FP8_PER_TENSOR = {"num_bits": FP8, "axis": None}
FP8_PER_CHANNEL = {"num_bits": FP8, "axis": 0}
FP8_PER_TOKEN_DYNAMIC = {"num_bits": FP8, "axis": None, "type": "dynamic", "block_sizes": {-1: None}}
FP8_BLOCK128X128 = {"num_bits": FP8, "axis": None, "block_sizes": {-1: 128, -2: 128}}


def _nvfp4(block: int = 16, type_: str = "dynamic", **extra) -> dict:
    """FP4 values with an FP8 scale per ``block`` elements (NVIDIA's NVFP4)."""
    return {"num_bits": FP4, **extra, "block_sizes": {-1: block, "type": type_, "scale_bits": FP8}}


def _mx(num_bits) -> dict:
    """OCP microscaling: blocks of 32 elements sharing an E8M0 scale."""
    return {"num_bits": num_bits, "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": E8M0}}


NVFP4 = _nvfp4(effective_bits=4.5)
NVFP4_BLOCK32 = _nvfp4(32)
NVFP4_STATIC_WEIGHT = _nvfp4(type_="static")
NVFP4_FOUR_OVER_SIX_WEIGHT = {
    "num_bits": FP4,
    "block_sizes": {-1: 16, "type": "static", "scale_bits": FP8, "four_over_six": 1},
}
MXFP4, MXFP6, MXFP8, MXINT8 = _mx(FP4), _mx(FP6), _mx(FP8), _mx(8)

# --------------------------------------------------------------------------------------------
# Shared rule lists

_BASE_DISABLE_ALL = [_off("*")]

#: Layers every model preset keeps in high precision: routers and gates of MoE layers, conv1d of
#: linear-attention/SSM blocks, output heads, multimodal towers, and norm/embedding layers.
_DEFAULT_DISABLED = [
    _off(name)
    for name in (
        "*block_sparse_moe.gate*",
        "*linear_attn.conv1d*",
        "*self_attention.conv1d*",
        "*linear_attn.in_proj_a*",
        "*linear_attn.in_proj_b*",
        "*lm_head*",
        "*mixer.conv1d*",
        "*mlp.gate.*",
        "*mlp.shared_expert_gate.*",
        "*output_layer*",
        "*proj_out.*",
        "*router*",
        "mtp.*",
        "output.*",
        "*embed_vision*",
        "*vision_tower*",
        "*visual*",
        "*vision_model*",
        "*multi_modal_projector*",
    )
] + [
    _off("*", parent_class=cls)
    for cls in ("nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d", "nn.LeakyReLU", "nn.Embedding")
]

#: Mamba-MoE hybrids: also keep latent projections and attention in high precision.
_MAMBA_MOE_DISABLED = [
    _off(name)
    for name in (
        "*fc1_latent_proj*",
        "*fc2_latent_proj*",
        "*q_proj*",
        "*k_proj*",
        "*v_proj*",
        "*o_proj*",
        "*self_attention.linear_qkv*",
        "*self_attention.linear_proj*",
    )
]
_MAMBA_MIXER_DISABLED = [_off("*mixer.in_proj*"), _off("*mixer.out_proj*")]

_MLP_PREFIXES = ("*mlp*", "*.mixer.up_proj.", "*.mixer.down_proj.", "*block_sparse_moe*")
_EXPERT_PREFIXES = ("*block_sparse_moe*", "*.experts.*")

_NO_ALGORITHM = object()


def _preset(*parts, algorithm=_NO_ALGORITHM) -> dict:
    """A preset from rule lists; every preset owns deep copies of the shared pieces."""
    quant_cfg = [copy.deepcopy(e) for part in parts for e in part]
    preset = {"quant_cfg": quant_cfg}
    if algorithm is not _NO_ALGORITHM:
        preset["algorithm"] = copy.deepcopy(algorithm)
    return preset


def _model_preset(weight, inputs, *extra, algorithm="max") -> dict:
    """Disable all, set ``*weight_quantizer``/``*input_quantizer``, disable the usual layers.

    ``inputs=None`` switches input quantizers off (weight-only); ``inputs=False`` leaves them out.
    """
    rules = [_on("*weight_quantizer", weight)]
    if inputs is None:
        rules.append(_off("*input_quantizer"))
    elif inputs is not False:
        rules.append(_on("*input_quantizer", inputs))
    return _preset(_BASE_DISABLE_ALL, rules, _DEFAULT_DISABLED, *extra, algorithm=algorithm)


# --------------------------------------------------------------------------------------------
# Integer presets

INT8_DEFAULT_CFG = _model_preset(INT8_PER_CHANNEL, INT8_PER_TENSOR)
INT8_SMOOTHQUANT_CFG = _model_preset(INT8_PER_CHANNEL, INT8_PER_TENSOR, algorithm="smoothquant")
INT8_WEIGHT_ONLY_CFG = _model_preset(INT8_PER_CHANNEL, None)
#: qpass's own (not one of ModelOpt's names, so not in :data:`choices`): INT8_DEFAULT_CFG with
#: asymmetric activations. Each input quantizer subtracts the midpoint of its calibrated range,
#: rounded to whole steps (``bias`` with qpass's ``zero_point``): a uint8 activation with a zero
#: point, the form of ONNX Runtime's quantize_static and of PT2E, which
#: ``export_onnx(..., target="onnxruntime")`` writes as plain QuantizeLinear/DequantizeLinear.
INT8_ASYMMETRIC_CFG = _model_preset(
    INT8_PER_CHANNEL, {**INT8_PER_TENSOR, "bias": {-1: None, -2: None, -3: None, -4: None, "type": "static",
                                                   "method": "histogram", "zero_point": True}})
INT4_BLOCKWISE_WEIGHT_ONLY_CFG = _model_preset(INT4_BLOCK128, None)
INT4_AWQ_CFG = _model_preset(INT4_BLOCK128, None, algorithm={"method": "awq_lite", "alpha_step": 0.1})
W4A8_AWQ_BETA_CFG = _model_preset([INT4_BLOCK128, FP8_PER_TENSOR], FP8_PER_TENSOR, algorithm="awq_lite")

# --------------------------------------------------------------------------------------------
# FP8 presets

FP8_DEFAULT_CFG = _model_preset(FP8_PER_TENSOR, FP8_PER_TENSOR)
FP8_PER_CHANNEL_PER_TOKEN_CFG = _model_preset(FP8_PER_CHANNEL, FP8_PER_TOKEN_DYNAMIC)
FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG = _model_preset(FP8_BLOCK128X128, None)
MAMBA_MOE_FP8_AGGRESSIVE_CFG = _model_preset(FP8_PER_TENSOR, FP8_PER_TENSOR, _MAMBA_MOE_DISABLED)
MAMBA_MOE_FP8_CONSERVATIVE_CFG = _model_preset(
    FP8_PER_TENSOR, FP8_PER_TENSOR, _MAMBA_MOE_DISABLED, _MAMBA_MIXER_DISABLED
)

# --------------------------------------------------------------------------------------------
# MX presets (dynamic, no calibration)

MXFP8_DEFAULT_CFG = _model_preset(MXFP8, MXFP8, algorithm=None)
MXFP6_DEFAULT_CFG = _model_preset(MXFP6, MXFP6, algorithm=None)
MXFP4_DEFAULT_CFG = _model_preset(MXFP4, MXFP4, algorithm=None)
MXINT8_DEFAULT_CFG = _model_preset(MXINT8, MXINT8, algorithm=None)
W4A8_MXFP4_FP8_CFG = _model_preset(MXFP4, FP8_PER_TENSOR, algorithm=None)
MXFP4_MLP_WEIGHT_ONLY_CFG = _preset(
    _BASE_DISABLE_ALL,
    [_on("*mlp*weight_quantizer", MXFP4), _on("*block_sparse_moe*weight_quantizer", MXFP4)],
    _DEFAULT_DISABLED,
    algorithm=None,
)

# --------------------------------------------------------------------------------------------
# NVFP4 presets

NVFP4_DEFAULT_CFG = _model_preset(NVFP4, NVFP4)
NVFP4_AWQ_LITE_CFG = _model_preset(NVFP4, NVFP4, algorithm="awq_lite")
NVFP4_AWQ_CLIP_CFG = _model_preset(NVFP4, NVFP4, algorithm={"method": "awq_clip"})
NVFP4_AWQ_FULL_CFG = _model_preset(NVFP4, NVFP4, algorithm={"method": "awq_full", "alpha_step": 0.1})
NVFP4_SVDQUANT_DEFAULT_CFG = _model_preset(NVFP4, NVFP4, algorithm={"method": "svdquant", "lowrank": 32})
NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG = _model_preset(
    NVFP4_STATIC_WEIGHT, NVFP4, algorithm={"method": "mse", "fp8_scale_sweep": True}
)
NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG = _model_preset(
    NVFP4_STATIC_WEIGHT, NVFP4, algorithm={"method": "local_hessian", "fp8_scale_sweep": True}
)
NVFP4_FOUR_OVER_SIX_CFG = _model_preset(
    NVFP4_FOUR_OVER_SIX_WEIGHT,
    NVFP4,
    algorithm={
        "method": "mse",
        "fp8_scale_sweep": False,
        "start_multiplier": 1.0,
        "stop_multiplier": 1.5,
        "step_size": 0.5,
    },
)
W4A16_NVFP4_CFG = _model_preset(NVFP4, False)
W4A8_NVFP4_FP8_CFG = _model_preset(NVFP4_BLOCK32, FP8_PER_TENSOR)
MAMBA_MOE_NVFP4_AGGRESSIVE_CFG = _model_preset(NVFP4, NVFP4, _MAMBA_MOE_DISABLED)
MAMBA_MOE_NVFP4_CONSERVATIVE_CFG = _model_preset(
    NVFP4, NVFP4, _MAMBA_MOE_DISABLED, _MAMBA_MIXER_DISABLED
)
NVFP4_MLP_WEIGHT_ONLY_CFG = _preset(
    _BASE_DISABLE_ALL,
    [_on("*mlp*weight_quantizer", NVFP4_BLOCK32),
     _on("*block_sparse_moe*weight_quantizer", NVFP4_BLOCK32)],
    _DEFAULT_DISABLED,
    algorithm="max",
)
NVFP4_MLP_ONLY_CFG = _preset(
    _BASE_DISABLE_ALL,
    _weights_and_inputs(NVFP4, _MLP_PREFIXES + ("*.experts.*",)),
    _DEFAULT_DISABLED,
    algorithm="max",
)
NVFP4_OMLP_ONLY_CFG = _preset(
    _BASE_DISABLE_ALL,
    _weights_and_inputs(NVFP4, ("*o_proj*",) + _MLP_PREFIXES),
    _DEFAULT_DISABLED,
    algorithm="max",
)
NVFP4_EXPERTS_ONLY_CFG = _preset(
    _BASE_DISABLE_ALL, _weights_and_inputs(NVFP4, _EXPERT_PREFIXES), _DEFAULT_DISABLED, algorithm="max"
)
# NVFP4 linear layers with FP8 attention (diffusion transformers); no default exclusions.
NVFP4_FP8_MHA_CONFIG = _preset(
    _BASE_DISABLE_ALL,
    _weights_and_inputs(NVFP4),
    [
        _off("*output_quantizer"),
        _on("*[qkv]_bmm_quantizer", FP8_PER_TENSOR),
        _on("*softmax_quantizer", FP8_PER_TENSOR),
        _on("*p_bmm_quantizer", FP8_PER_TENSOR),
        _on("transformer_blocks*bmm2_output_quantizer", FP8_PER_TENSOR),
    ],
    algorithm="max",
)

# --------------------------------------------------------------------------------------------
# KV-cache presets: no "*" rule and (except the rotate one) no algorithm; merge into a model preset.

_KV = "*[kv]_bmm_quantizer"
_KV_AFFINE_BIAS = {"bias": {-2: None, -4: None, "type": "static"}}

FP8_KV_CFG = _preset([_on(_KV, FP8_PER_TENSOR)])
FP8_AFFINE_KV_CFG = _preset([_on(_KV, FP8_PER_TENSOR), _on(_KV, {**FP8_PER_TENSOR, **_KV_AFFINE_BIAS})])
NVFP4_KV_CFG = _preset([_on(_KV, NVFP4)])
NVFP4_AFFINE_KV_CFG = _preset([_on(_KV, NVFP4), _on(_KV, {**NVFP4, **_KV_AFFINE_BIAS})])
NVFP4_KV_ROTATE_CFG = _preset(
    [
        {"quantizer_name": "*q_bmm_quantizer", "cfg": {"rotate": True}, "enable": False},
        _on("*k_bmm_quantizer", {**NVFP4, "rotate": True}),
        _on("*v_bmm_quantizer", NVFP4),
    ],
    algorithm="max",
)

# --------------------------------------------------------------------------------------------

#: qpass's own presets, accepted by name like ModelOpt's
QPASS_PRESETS = ("INT8_ASYMMETRIC_CFG",)

#: Names of all of ModelOpt 0.47's presets (its ``mtq.config.choices``).
choices: set[str] = {
    name for name, value in dict(globals()).items()
    if name.isupper() and isinstance(value, dict) and "quant_cfg" in value and name not in QPASS_PRESETS
}


def get_preset(name: str) -> dict:
    """A deep copy of the preset called ``name`` (one of :data:`choices` or :data:`QPASS_PRESETS`)."""
    known = sorted(choices) + list(QPASS_PRESETS)
    if not isinstance(name, str) or name not in known:
        close = difflib.get_close_matches(str(name), known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise QuantConfigError(
            f"unknown preset {name!r}{hint}; choices: {', '.join(known)}"
        )
    return copy.deepcopy(globals()[name])
