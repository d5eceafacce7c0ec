"""Pattern rules: which ops and modules get which quantizer slots.

Rules are data. ``insert_quantizers`` only places nodes where a rule matches; it
decides nothing about formats (the config does that).

Two rule sets ship:

* ``"default"``: Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d get
  ``input_quantizer``, ``weight_quantizer`` and ``output_quantizer``;
  ``scaled_dot_product_attention`` gets ``q_bmm_quantizer``, ``k_bmm_quantizer``,
  ``v_bmm_quantizer`` and ``softmax_quantizer`` on its owning module; an explicit
  attention (matmul/bmm of two activations) gets ``q_bmm``/``k_bmm`` on the score
  matmul and ``softmax``/``v_bmm`` on the output matmul.
* both: fused mixture-of-experts parameters get ``<param>_input_quantizer`` and per-expert
  ``<param>_weight_quantizers.{e}`` (:class:`ExpertRule`);
* ``"modelopt"``: the default plus ModelOpt's input-only quantizers on LayerNorm,
  BatchNorm, InstanceNorm, pooling and LeakyReLU modules and Embedding's three
  slots, and ModelOpt's name ``p_bmm_quantizer`` for the attention
  probabilities, so quantizer names match ModelOpt's exactly.

Naming of ops with no module of their own: their slots are registered on the
innermost module that owns the op (from ``nn_module_stack``), e.g.
``model.layers.0.self_attn.q_bmm_quantizer``; at the root they are registered on
the model itself. Two such ops in one module share the slot's quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

aten = torch.ops.aten

# Where a slot reads from: argument index of the matched op, or its output.
OUT = -1
# A slot registered on the owner for ModelOpt name parity, with no node to place
# (SDPA computes its probabilities internally).
REGISTER_ONLY = None


@dataclass(frozen=True)
class Slot:
    name: str
    arg: int | None  # index into node.args, OUT, or REGISTER_ONLY


def module_matches(module: nn.Module, types: tuple | None, own_forward: bool = False) -> bool:
    """``module`` is one of ``types``; with ``own_forward``, also runs that type's own forward,
    as ModelOpt's registry matches a subclass only if it does not override ``forward`` (OPT's
    learned positional embedding, ConvNeXt's channels-first LayerNorm are left alone there)."""
    if types is None:
        return True
    if not own_forward:
        return isinstance(module, types)
    return any(isinstance(module, t) and type(module).forward is t.forward for t in types)


@dataclass(frozen=True)
class ModuleRule:
    """Quantizers registered from the module tree, before any trace."""

    module_types: tuple
    slots: tuple  # slot names
    hard_disabled: tuple = ()  # registered (for ModelOpt names) but never used
    own_forward: bool = False  # subclasses only if they keep the type's forward (module_matches)

    def matches(self, module: nn.Module) -> bool:
        return module_matches(module, self.module_types, self.own_forward)


@dataclass(frozen=True)
class OpRule:
    """Quantizer nodes placed around matching graph ops."""

    name: str
    ops: tuple
    slots: tuple  # of Slot
    module_types: tuple | None = None  # owner must be one of these; None: any owner
    weight_arg: int | None = None  # this arg must be the owner's own ``.weight``
    activation_args: tuple = ()  # these args must not be parameters
    after_softmax: bool | None = None  # arg 0 must (True) or must not (False) come from a softmax
    own_forward: bool = False  # as ModuleRule.own_forward

    def matches(self, module: nn.Module) -> bool:
        return module_matches(module, self.module_types, self.own_forward)


_LINEAR = (nn.Linear,)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_WEIGHTED_SLOTS = (Slot("input_quantizer", 0), Slot("weight_quantizer", 1), Slot("output_quantizer", OUT))

WEIGHTED_MODULES = ModuleRule(_LINEAR + _CONV + _CONV_T, ("input_quantizer", "weight_quantizer", "output_quantizer"))

LINEAR = OpRule("linear", (aten.linear.default,), _WEIGHTED_SLOTS, _LINEAR, weight_arg=1)
CONV = OpRule(
    "conv",
    (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
     aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default),
    _WEIGHTED_SLOTS, _CONV, weight_arg=1,
)
CONV_TRANSPOSE = OpRule(
    "conv_transpose",
    (aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input,
     aten.convolution.default),
    _WEIGHTED_SLOTS, _CONV_T, weight_arg=1,
)


def _attention_rules(probs_slot: str) -> tuple:
    sdpa = OpRule(
        "sdpa",
        (aten.scaled_dot_product_attention.default,),
        (Slot("q_bmm_quantizer", 0), Slot("k_bmm_quantizer", 1), Slot("v_bmm_quantizer", 2),
         Slot(probs_slot, REGISTER_ONLY)),
        activation_args=(0, 1, 2),
    )
    # matmul/bmm of two activations: the attention score product (q @ k^T) ...
    scores = OpRule(
        "attn_scores",
        (aten.matmul.default, aten.bmm.default),
        (Slot("q_bmm_quantizer", 0), Slot("k_bmm_quantizer", 1)),
        activation_args=(0, 1),
        after_softmax=False,
    )
    # ... or the probabilities times values, recognised by a softmax producer.
    context = OpRule(
        "attn_context",
        (aten.matmul.default, aten.bmm.default),
        (Slot(probs_slot, 0), Slot("v_bmm_quantizer", 1)),
        activation_args=(0, 1),
        after_softmax=True,
    )
    return sdpa, scores, context


@dataclass(frozen=True)
class ExpertRule:
    """Fused mixture-of-experts parameters (transformers 5: ``experts.gate_up_proj [E, 2I, H]``,
    ``experts.down_proj [E, H, I]``), found on any module with an integer ``num_experts`` whose
    3-D parameters lead with that many experts (:func:`fused_expert_params`).

    Each such parameter ``p`` gets ``p_input_quantizer`` on the activation it multiplies and, on
    the parameter itself, ``p_weight_quantizers``: one weight quantizer per expert, each on expert
    ``e``'s ``[out, in]`` matrix (ModelOpt 0.47's ``_QuantFusedExperts``). A module with
    ``is_transposed=True`` (GPT-OSS: ``[E, in, out]``) or without that attribute (Llama 4) gets one
    ``p_weight_quantizer`` on the whole 3-D parameter instead, transposed to ``[E, out, in]`` around
    it, as ModelOpt's GPT-OSS and Llama 4 experts do (``axis=0`` is then one amax per expert;
    INT4/NVFP4 blocks run along the input dim). In the graph the parameter reaches a matmul through
    ``layout_ops`` (transpose, per-token expert gather, ...); the matmul's other tensor operand is
    the activation."""

    matmul_ops: tuple  # aten ops multiplying activations by expert weights
    matmul_op_names: tuple  # custom ops, by qualified name (their library may not be loaded)
    layout_ops: tuple
    input_suffix: str = "_input_quantizer"
    weight_suffix: str = "_weight_quantizers"  # per expert
    whole_weight_suffix: str = "_weight_quantizer"  # transposed layout: one quantizer, whole parameter

    def weight_slot(self, module: nn.Module, param: str) -> str:
        return param + (self.whole_weight_suffix if self.transposed(module) else self.weight_suffix)

    @staticmethod
    def transposed(module: nn.Module) -> bool:
        """``[E, in, out]`` parameters: their one weight quantizer sees ``[E, out, in]`` (the
        parameter transposed), so blocks and channels run as for every other weight.

        transformers 5's experts (``@use_experts_implementation``) say so in ``is_transposed``;
        the older fused modules without it (Llama 4's ``Llama4TextExperts``: ``bmm(x, W)`` with
        ``W [E, in, out]``) keep the transposed layout, as ModelOpt assumes for them."""
        return getattr(module, "is_transposed", True) is True

    def quantized_view(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` as the parameter's weight quantizer sees it (``[E, out, in]``)."""
        return weight.mT if self.transposed(module) else weight

    def is_weight_slot(self, slot: str) -> bool:
        """An expert parameter's weight slot (either layout); not a Linear's ``weight_quantizer``."""
        return slot.endswith(self.weight_suffix) or (slot.endswith(self.whole_weight_suffix)
                                                      and slot != "weight_quantizer")


EXPERTS = ExpertRule(
    matmul_ops=(aten.bmm.default, aten.matmul.default, aten.mm.default, aten.linear.default),
    matmul_op_names=("transformers::grouped_mm_fallback", "aten::_grouped_mm", "aten::grouped_mm"),
    layout_ops=(aten.transpose.int, aten.permute.default, aten.t.default, aten.view.default, aten.reshape.default,
                aten.index.Tensor, aten.select.int, aten.contiguous.default, aten.expand.default,
                aten.unsqueeze.default, aten.to.dtype, aten._to_copy.default, aten.alias.default,
                aten.clone.default),
)


def fused_expert_params(module: nn.Module) -> list[str]:
    """Names of ``module``'s own fused expert parameters: 3-D, first dim ``module.num_experts``
    (also once ``real_quantize`` packed them: their placeholder is a buffer of zero strides)."""
    n = getattr(module, "num_experts", None)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return []
    packed = [(k, b) for k, b in module._buffers.items() if b is not None and b.dim() == 3 and not any(b.stride())]
    return [name for name, p in list(module._parameters.items()) + packed
            if p is not None and p.dim() == 3 and p.shape[0] == n]


@dataclass(frozen=True)
class RuleSet:
    name: str
    module_rules: tuple  # of ModuleRule
    op_rules: tuple  # of OpRule
    attention_probs_slot: str
    expert_rule: ExpertRule | None = EXPERTS

    @property
    def attention_slots(self) -> tuple:
        return ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", self.attention_probs_slot)


DEFAULT = RuleSet(
    name="default",
    module_rules=(WEIGHTED_MODULES,),
    op_rules=(LINEAR, CONV, CONV_TRANSPOSE) + _attention_rules("softmax_quantizer"),
    attention_probs_slot="softmax_quantizer",
)

_INPUT_ONLY_TYPES = (
    nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.LeakyReLU,
)
INPUT_ONLY = OpRule(
    "input_only",
    (aten.layer_norm.default, aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
     aten.instance_norm.default,
     aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
     aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
     aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default,
     aten.leaky_relu.default),
    (Slot("input_quantizer", 0), Slot("output_quantizer", OUT)),
    _INPUT_ONLY_TYPES, own_forward=True,
)
EMBEDDING = OpRule(
    "embedding", (aten.embedding.default,),
    (Slot("weight_quantizer", 0), Slot("output_quantizer", OUT)), (nn.Embedding,), weight_arg=0, own_forward=True,
)

MODELOPT = RuleSet(
    name="modelopt",
    module_rules=(
        WEIGHTED_MODULES,
        ModuleRule(_INPUT_ONLY_TYPES, ("input_quantizer", "output_quantizer"), own_forward=True),
        ModuleRule((nn.Embedding,), ("weight_quantizer", "input_quantizer", "output_quantizer"),
                   hard_disabled=("input_quantizer",), own_forward=True),
    ),
    op_rules=(LINEAR, CONV, CONV_TRANSPOSE, INPUT_ONLY, EMBEDDING) + _attention_rules("p_bmm_quantizer"),
    attention_probs_slot="p_bmm_quantizer",
)

RULE_SETS = {"default": DEFAULT, "modelopt": MODELOPT}


def get_rule_set(rules) -> RuleSet:
    from qpass.errors import QuantConfigError

    if isinstance(rules, RuleSet):
        return rules
    if rules is None:
        return DEFAULT
    if rules not in RULE_SETS:
        raise QuantConfigError(f"unknown rule set {rules!r}; choices: {sorted(RULE_SETS)}")
    return RULE_SETS[rules]
