"""Differential tests against ModelOpt 0.47 on the real models (same data, same configs).

* quantizer names with their enabled flags: identical on every Linear/Conv quantizer with
  the default rules, and on every quantizer with ``rules="modelopt"``;
* max-calibrated amax: equal (relative difference < 1e-6);
* model outputs: cosine > 0.9999 to ModelOpt's quantized outputs (``rules="modelopt"``).

MXFP8: ModelOpt's MX forward needs CUDA, so names and flags only (numerics are checked against
an independent reference in tests/formats).
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import qpass
from qpass import zoo
from qpass.nn.tensor_quantizer import TensorQuantizer

from conftest import needs_minilm, needs_smollm2

mtq = pytest.importorskip("modelopt.torch.quantization")

pytestmark = [pytest.mark.modelopt, pytest.mark.real_model]

CONFIGS = ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "INT8_WEIGHT_ONLY_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
           "MXFP8_DEFAULT_CFG"]
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@pytest.fixture(scope="module")
def minilm_case():
    model, tok = zoo.load_minilm()
    texts = zoo.sentence_chunks(zoo.text_split().calib, 12)
    batches = zoo.minilm_batches(tok, texts, batch_size=4, max_length=48)
    return model, batches, lambda m, b: m(**b).last_hidden_state


@pytest.fixture(scope="module")
def smollm2_case():
    model, tok = zoo.load_smollm2(num_layers=4)
    windows = zoo.token_windows(tok, zoo.text_split().calib, 4, 48)
    batches = [dict(input_ids=windows[i : i + 2], use_cache=False) for i in (0, 2)]
    return model, batches, lambda m, b: m(**b).logits


def _modelopt_quantize(model, name, batches):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mtq.quantize(model, copy.deepcopy(getattr(mtq, name)), lambda m: [m(**b) for b in batches])


def _flags(model, weighted_only):
    out = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if "Quantizer" not in kind or "Sequential" in kind:
            continue
        owner = model.get_submodule(name.rpartition(".")[0])
        if weighted_only and not isinstance(owner, _WEIGHTED):
            continue
        out[name] = bool(module.is_enabled)
    return out


def _amax(model):
    return {n: m.amax.detach().float() for n, m in model.named_modules()
            if hasattr(m, "is_enabled") and m.is_enabled and getattr(m, "amax", None) is not None}


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


_MODELOPT_RESULTS = {}


def _modelopt_model(case, config):
    """ModelOpt's quantized model for this case and config (shared by both rule sets)."""
    key = (id(case), config)
    if key not in _MODELOPT_RESULTS:
        _MODELOPT_RESULTS[key] = _modelopt_build(case, config)
    return _MODELOPT_RESULTS[key]


def _modelopt_build(case, config):
    base, batches, _ = case
    if config == "MXFP8_DEFAULT_CFG":
        theirs = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # ModelOpt cannot calibrate/run MX on CPU: insert its quantizers without calibration.
            mtq.quantize(theirs, copy.deepcopy(mtq.MXFP8_DEFAULT_CFG) | {"algorithm": None}, None)
            with torch.no_grad():
                try:
                    theirs(**batches[0])  # instantiate lazily registered attention quantizers
                except Exception:  # noqa: BLE001 - ModelOpt's MX forward needs CUDA
                    pass
        return theirs
    return _modelopt_quantize(copy.deepcopy(base), config, batches)


def _run_parity(case, config, rules):
    base, batches, output = case
    ours = qpass.quantize(copy.deepcopy(base), config, lambda m: [m(**b) for b in batches], rules=rules)
    theirs = _modelopt_model(case, config)
    with torch.no_grad():
        output(ours, batches[0])  # attention quantizers appear when the graph is first traced
    weighted_only = rules == "default"
    assert _flags(ours, weighted_only) == _flags(theirs, weighted_only)
    if config == "MXFP8_DEFAULT_CFG":
        return
    a_ours, a_theirs = _amax(ours), _amax(theirs)
    assert set(a_ours) == set(a_theirs) or weighted_only
    for name in set(a_ours) & set(a_theirs):
        torch.testing.assert_close(a_ours[name].reshape(a_theirs[name].shape), a_theirs[name], rtol=1e-6, atol=0)
    if rules == "modelopt":
        with torch.no_grad():
            for b in batches:
                assert _cos(output(ours, b), output(theirs, b)) > 0.9999


@needs_minilm
@pytest.mark.parametrize("rules", ["default", "modelopt"])
@pytest.mark.parametrize("config", CONFIGS)
def test_minilm_parity(minilm_case, config, rules):
    _run_parity(minilm_case, config, rules)


@needs_smollm2
@pytest.mark.slow  # parsing the GGUF file alone takes most of a minute on 2 cores
@pytest.mark.parametrize("rules", ["default", "modelopt"])
@pytest.mark.parametrize("config", CONFIGS)
def test_smollm2_parity(smollm2_case, config, rules):
    _run_parity(smollm2_case, config, rules)
