"""Turn any accepted config shape into ``(list[Rule], algorithm)``.

Accepted ``quant_cfg`` shapes, as in ModelOpt 0.47's ``normalize_quant_cfg_list``:

* the list form ``[{"quantizer_name": ..., "parent_class": ..., "cfg": ..., "enable": ...}]``;
* the older dict form ``{"*weight_quantizer": {...}, "default": {...}, "nn.Linear": {...}}``,
  read in its own key order (``"default"`` means ``"*"`` and stays where it is written);
  a list of single-key dicts of that form is read the same way.

qpass also takes callable keys (filter functions on the quantizer name) and :class:`Rule`
objects.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch.nn as nn

from qpass.errors import QuantConfigError

from .algorithms import normalize_algorithm
from .attributes import QuantizerAttributes
from .rules import Rule

ENTRY_KEYS = ("quantizer_name", "parent_class", "cfg", "enable")
CONFIG_KEYS = ("quant_cfg", "algorithm", "effective_bits")
# ModelOpt's quant_cfg when a config has none.
DEFAULT_QUANT_CFG = [{"quantizer_name": "*", "cfg": {"num_bits": 8, "axis": None}}]

_UNSET = object()


def _is_empty_cfg(cfg) -> bool:
    if isinstance(cfg, dict):
        return not cfg
    if isinstance(cfg, list):
        return not cfg or all(isinstance(c, dict) and not c for c in cfg)
    return False


def _check_cfg_dict(cfg, where, key):
    if not isinstance(cfg, dict):
        raise QuantConfigError(
            f"{where}: 'cfg' must be a dict of quantizer attributes or a list of such dicts, "
            f"got {type(cfg).__name__}: {cfg!r}"
        )
    if cfg == {"enable": True}:
        raise QuantConfigError(
            f"{where}: 'cfg' of {key!r} is only {{'enable': True}}; give quantizer attributes, "
            "or drop 'cfg' and put 'enable': True on the entry"
        )
    # Validate now so a bad attribute is reported with its entry, not when a model is quantized.
    named = isinstance(key, str) and repr(key) not in where
    attrs = QuantizerAttributes.from_dict(cfg, key=f"{where} {key!r}" if named else where)
    # Keep only what the entry names, in checked form (tuples, int block axes); "enable"
    # inside cfg is ignored by ModelOpt (the entry's own "enable" decides), so drop it.
    return {k: copy.deepcopy(getattr(attrs, k)) for k in cfg if k != "enable"}


def _check_parent_class(parent_class, where):
    if parent_class is None or isinstance(parent_class, type):
        return parent_class
    if not isinstance(parent_class, str) or not parent_class:
        raise QuantConfigError(
            f"{where}: 'parent_class' must be a class name like 'nn.Linear' or a class, "
            f"got {parent_class!r}"
        )
    if parent_class.startswith("nn.") and not isinstance(getattr(nn, parent_class[3:], None), type):
        raise QuantConfigError(
            f"{where}: 'parent_class' {parent_class!r} is not a torch.nn class; "
            "use e.g. 'nn.Linear', 'nn.Conv2d', 'nn.BatchNorm2d'"
        )
    return parent_class


def _make_rule(where, pattern, parent_class=None, cfg=_UNSET, enable=_UNSET) -> Rule:
    """Validate one entry the way ModelOpt's ``QuantizerCfgEntry`` does."""
    if not (isinstance(pattern, str) or callable(pattern)):
        raise QuantConfigError(
            f"{where}: 'quantizer_name' must be a wildcard string or a filter function, "
            f"got {pattern!r}"
        )
    if cfg is _UNSET and enable is _UNSET:
        raise QuantConfigError(
            f"{where}: entry for {pattern!r} must give 'cfg', 'enable', or both; "
            "an entry with only 'quantizer_name' does nothing"
        )
    if enable is not _UNSET and enable is not None and not isinstance(enable, bool):
        raise QuantConfigError(f"{where}: 'enable' must be True or False, got {enable!r}")
    enable = True if enable in (_UNSET, None) else enable
    cfg = None if cfg is _UNSET else cfg
    if _is_empty_cfg(cfg):
        if not enable:
            cfg = None
        else:
            raise QuantConfigError(
                f"{where}: 'cfg' for {pattern!r} is empty; give at least one quantizer "
                "attribute, or drop 'cfg' and use 'enable' to switch the quantizer on or off"
            )
    if isinstance(cfg, list):
        cfg = [_check_cfg_dict(c, f"{where}['cfg'][{i}]", pattern) for i, c in enumerate(cfg)]
    elif cfg is not None:
        cfg = _check_cfg_dict(cfg, where, pattern)
    parent_class = _check_parent_class(parent_class, where)
    return Rule(pattern=pattern, parent_class=parent_class, cfg=cfg, enable=enable)


def _legacy_pair(key, value, where) -> list[Rule]:
    """One ``key: value`` pair of the older dict form."""
    if key == "default":
        key = "*"
    if isinstance(key, str) and key.startswith("nn."):
        if not isinstance(value, Mapping):
            raise QuantConfigError(
                f"{where}: class-scoped key {key!r} needs a dict {{quantizer wildcard: attributes}}, "
                f"got {value!r}"
            )
        rules = []
        for q_name, sub in value.items():
            sub_where = f"{where}[{q_name!r}]"
            if not isinstance(sub, Mapping):
                raise QuantConfigError(f"{sub_where}: attributes must be a dict, got {sub!r}")
            sub = dict(sub)
            enable = sub.pop("enable", _UNSET)
            rules.append(_make_rule(sub_where, q_name, key, sub or None, enable))
        return rules
    if isinstance(value, Mapping):
        cfg = {k: v for k, v in value.items() if k != "enable"} or None
        return [_make_rule(where, key, None, cfg, value.get("enable", _UNSET))]
    return [_make_rule(where, key, None, value)]


def normalize_quant_cfg(quant_cfg, where: str = "quant_cfg") -> list[Rule]:
    """Rules from a ``quant_cfg`` in list form, dict form, or a mix (see module docstring)."""
    if isinstance(quant_cfg, Mapping):
        return [r for k, v in quant_cfg.items() for r in _legacy_pair(k, v, f"{where}[{k!r}]")]
    if not isinstance(quant_cfg, (list, tuple)):
        raise QuantConfigError(
            f"{where}: must be a list of entries (or the older dict form), "
            f"got {type(quant_cfg).__name__}: {quant_cfg!r}"
        )
    rules: list[Rule] = []
    for i, raw in enumerate(quant_cfg):
        at = f"{where}[{i}]"
        if isinstance(raw, Rule):
            rules.append(_make_rule(at, raw.pattern, raw.parent_class,
                                    _UNSET if raw.cfg is None else raw.cfg, raw.enable))
        elif isinstance(raw, Mapping) and "quantizer_name" in raw:
            extra = [k for k in raw if k not in ENTRY_KEYS]
            if extra:
                raise QuantConfigError(
                    f"{at}: unknown entry key(s) {extra}; allowed keys: {', '.join(ENTRY_KEYS)}"
                )
            rules.append(_make_rule(at, raw["quantizer_name"], raw.get("parent_class"),
                                    raw.get("cfg", _UNSET), raw.get("enable", _UNSET)))
        elif isinstance(raw, Mapping) and len(raw) == 1:
            (k, v), = raw.items()
            rules.extend(_legacy_pair(k, v, f"{at}[{k!r}]"))
        elif isinstance(raw, Mapping) and any(isinstance(k, str) and k.startswith("nn.") for k in raw):
            for k, v in raw.items():
                rules.extend(_legacy_pair(k, v, f"{at}[{k!r}]"))
        else:
            raise QuantConfigError(
                f"{at}: not a quant_cfg entry: {raw!r}; expected a dict with keys "
                f"{', '.join(ENTRY_KEYS)} or a single {{wildcard: attributes}} pair"
            )
    return rules


def normalize_config(config):
    """``(rules, algorithm)`` from a preset name or a ``{"quant_cfg", "algorithm"}`` dict.

    A missing ``"quant_cfg"`` means ModelOpt's default (every quantizer 8-bit per tensor).
    A missing ``"algorithm"`` gives ``None``: ``mtq.quantize`` then runs no calibration.
    The algorithm comes back as ``{"method": name, **options}``, ``None``, or a list of those.
    """
    if isinstance(config, str):
        from .presets import get_preset

        config = get_preset(config)
    if not isinstance(config, Mapping):
        raise QuantConfigError(
            f"config must be a preset name or a dict with keys {', '.join(CONFIG_KEYS)}, "
            f"got {type(config).__name__}: {config!r}"
        )
    extra = [k for k in config if k not in CONFIG_KEYS]
    if extra:
        raise QuantConfigError(
            f"config: unknown key(s) {extra}; allowed keys: {', '.join(CONFIG_KEYS)}"
        )
    eb = config.get("effective_bits")
    if eb is not None and not (isinstance(eb, (int, float)) and not isinstance(eb, bool) and 0 < eb <= 16):
        raise QuantConfigError(f"config['effective_bits']: must be None or in (0, 16], got {eb!r}")
    quant_cfg = config.get("quant_cfg", DEFAULT_QUANT_CFG)
    rules = normalize_quant_cfg(quant_cfg, "quant_cfg")
    algorithm = normalize_algorithm(config.get("algorithm"), "algorithm")
    return rules, algorithm
