"""Rules: which quantizers a ``quant_cfg`` entry selects, and what they end up with.

Semantics follow ModelOpt 0.47's ``set_quantizer_by_cfg``:

* rules apply in list order and a later rule wins over an earlier one;
* a rule with ``cfg`` *replaces* all attributes of the quantizers it matches (attributes it does
  not name go back to their defaults, they are not merged with what earlier rules set), and the
  quantizer is enabled unless the rule says ``enable=False`` (an ``"enable"`` inside ``cfg`` is
  ignored);
* a rule without ``cfg`` only switches ``enable``; switching off also switches off rotation;
* a ``cfg`` list turns the quantizer into a sequence of quantizers, one per dict.
"""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .attributes import QuantizerAttributes

Pattern = str | Callable[[str], bool]


@dataclass
class Rule:
    """One ``quant_cfg`` entry.

    pattern: fnmatch wildcard on the quantizer's full dotted name (``"*weight_quantizer"``,
        ``"*[kv]_bmm_quantizer"``) or a callable taking that name and returning a bool.
    parent_class: restricts the rule to quantizers whose owning module is exactly this class
        (``"nn.Linear"``, ``"Linear"``, ``"torch.nn.modules.linear.Linear"`` or the class itself);
        subclasses do not match, as in ModelOpt.
    cfg: ``None`` (only toggle ``enable``), an attribute dict, or a list of attribute dicts
        (a sequence of quantizers, e.g. INT4 then FP8 for W4A8).
    enable: ``True``/``False``; ``None`` means ``True``.
    """

    pattern: Pattern
    parent_class: str | type | None = None
    cfg: dict | list[dict] | None = None
    enable: bool | None = None

    def to_entry(self) -> dict:
        """The ModelOpt 0.47 list-form entry for this rule."""
        entry: dict[str, Any] = {"quantizer_name": self.pattern}
        if self.parent_class is not None:
            entry["parent_class"] = self.parent_class
        if self.cfg is not None:
            entry["cfg"] = copy.deepcopy(self.cfg)
        entry["enable"] = self.enable is not False
        return entry


# Fused-expert modules keep per-expert quantizers in a ModuleList ("..._weight_quantizers.3");
# ModelOpt also tries the name with the index dropped, so "*weight_quantizer" still matches.
_EXPERT_LIST_RE = re.compile(r"(weight_quantizers?|input_quantizers?)\.\d+(?=$|\.)")


def _strip_expert_index(name: str) -> str:
    return _EXPERT_LIST_RE.sub(lambda m: m.group(1).removesuffix("s"), name)


def pattern_matches(pattern: Pattern, quantizer_name: str) -> bool:
    """Whether a wildcard (case-sensitive fnmatch on the full name) or filter selects the name."""
    if isinstance(pattern, str):
        if fnmatch.fnmatchcase(quantizer_name, pattern):
            return True
        stripped = _strip_expert_index(quantizer_name)
        return stripped != quantizer_name and fnmatch.fnmatchcase(stripped, pattern)
    if callable(pattern):
        return bool(pattern(quantizer_name))
    raise TypeError(f"rule pattern must be a str or callable, got {type(pattern).__name__}")


def class_names(cls: type) -> set[str]:
    """Every spelling of ``cls`` that a ``parent_class`` string may use."""
    names = {cls.__name__, cls.__qualname__, f"{cls.__module__}.{cls.__qualname__}"}
    if cls.__module__.startswith("torch.nn.") and getattr(nn, cls.__name__, None) is cls:
        names |= {f"nn.{cls.__name__}", f"torch.nn.{cls.__name__}"}
    if cls.__module__.startswith("transformers."):
        names.add(f"hf.{cls.__name__}")
    return names


def parent_class_matches(parent_class: str | type | None, parent_module: Any) -> bool:
    if parent_class is None:
        return True
    if parent_module is None:
        return False
    cls = type(parent_module)
    if isinstance(parent_class, type):
        return cls is parent_class
    return parent_class in class_names(cls)


def rule_matches(rule: Rule, quantizer_name: str, parent_module: Any = None) -> bool:
    """Whether ``rule`` selects the quantizer ``quantizer_name`` owned by ``parent_module``.

    ``quantizer_name`` is the full dotted name (``"layers.0.mlp.fc1.weight_quantizer"``) and
    ``parent_module`` the original (unquantized) module that owns the quantizer.
    """
    return pattern_matches(rule.pattern, quantizer_name) and parent_class_matches(
        rule.parent_class, parent_module
    )


_PER_CHANNEL_WEIGHT_PARENTS = (nn.Linear, nn.modules.conv._ConvNd)


def default_attributes(quantizer_name: str, parent_module: Any = None) -> QuantizerAttributes:
    """What ModelOpt gives a quantizer before any rule touches it.

    8-bit per-tensor everywhere, except weights of Linear/Conv layers (8-bit per output channel,
    axis 0), and output quantizers and embedding input quantizers (disabled).
    """
    leaf = quantizer_name.rsplit(".", 1)[-1]
    if leaf == "output_quantizer" or is_hard_disabled(quantizer_name, parent_module):
        return QuantizerAttributes(enable=False)
    if leaf == "weight_quantizer" and isinstance(parent_module, _PER_CHANNEL_WEIGHT_PARENTS):
        return QuantizerAttributes(axis=0)
    return QuantizerAttributes()


def is_hard_disabled(quantizer_name: str, parent_module: Any = None) -> bool:
    """Quantizers that stay off whatever the rules say, as in ModelOpt.

    The input of an embedding is integer indices, so its ``input_quantizer`` never quantizes.
    """
    return quantizer_name.rsplit(".", 1)[-1] == "input_quantizer" and isinstance(
        parent_module, nn.Embedding
    )


def _switch(attrs: QuantizerAttributes, enable: bool) -> QuantizerAttributes:
    out = copy.deepcopy(attrs)
    out.enable = enable
    if not enable:
        out.rotate = dict(out.rotate, enable=False) if isinstance(out.rotate, dict) else False
    return out


def _from_cfg(cfg: dict, enable: bool, key) -> QuantizerAttributes:
    d = {k: v for k, v in cfg.items() if k != "enable"}
    d["enable"] = enable
    return QuantizerAttributes.from_dict(d, key=key)


def apply_rule(state, rule: Rule, initial: QuantizerAttributes):
    """The quantizer state after ``rule`` (already known to match) is applied to ``state``."""
    enable = rule.enable is not False
    key = rule.pattern if isinstance(rule.pattern, str) else getattr(rule.pattern, "__name__", rule.pattern)
    if rule.cfg is None:
        if state is None:
            state = initial
        if isinstance(state, list):
            return [_switch(a, enable) for a in state]
        return _switch(state, enable)
    if isinstance(rule.cfg, dict):
        return _from_cfg(rule.cfg, enable, key)
    # A sequence replaces whatever was there. (ModelOpt 0.47, re-applying a list cfg to an
    # existing sequence, nests a new sequence inside each member: a bug qpass does not copy.)
    return [_from_cfg(c, enable, key) for c in rule.cfg]


def resolve_attributes(
    rules: list[Rule],
    quantizer_name: str,
    parent_module: Any = None,
    *,
    initial: QuantizerAttributes | None = None,
) -> QuantizerAttributes | list[QuantizerAttributes] | None:
    """Apply every matching rule in order; ``None`` when no rule matches the quantizer.

    A list comes back when a sequence ``cfg`` applies. ``initial`` is the state an enable-only
    rule toggles when no earlier rule configured the quantizer; it defaults to
    :func:`default_attributes` (ModelOpt's starting state).
    """
    state = None
    for rule in rules:
        if rule_matches(rule, quantizer_name, parent_module):
            if state is None and rule.cfg is None and initial is None:
                initial = default_attributes(quantizer_name, parent_module)
            state = apply_rule(state, rule, initial)
    if state is not None and is_hard_disabled(quantizer_name, parent_module):
        for a in state if isinstance(state, list) else [state]:
            a.enable = False
    return state
