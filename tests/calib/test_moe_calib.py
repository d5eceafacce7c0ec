"""MoE calibration as ModelOpt 0.47 does it.

``moe_calib_experts_ratio``: each MoE block also runs, for the quantizers' statistics only, with its
router's ``top_k`` raised to ``round(num_experts * ratio)``; the model's own routing is unchanged.
Without it, max calibration gives a sequential MoE block's experts one input amax (and with
``sync_expert_weight_amax``, one weight amax)."""

import copy
import warnings

import pytest
import torch
from torch import nn

import qpass
from qpass.errors import QuantConfigError

from conftest import has_package

EXPERTS, TOP_K, HIDDEN = 4, 1, 16


class Router(nn.Module):
    """transformers 5's TopKRouter interface: (logits, routing weights, expert indices)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(EXPERTS, HIDDEN))
        self.top_k, self.num_experts = TOP_K, EXPERTS

    def forward(self, x):
        logits = nn.functional.linear(x, self.weight)
        weights, index = torch.topk(logits.softmax(-1), self.top_k, dim=-1)
        return logits, weights / weights.sum(-1, keepdim=True), index


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(HIDDEN, 2 * HIDDEN), nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class SparseMoe(nn.Module):
    """Sequential experts (one module each), as ModelOpt 0.47's MoE ratio supports them."""

    def __init__(self):
        super().__init__()
        self.gate = Router()
        self.experts = nn.ModuleList(Expert() for _ in range(EXPERTS))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        _, weights, index = self.gate(flat)
        return _dispatch(flat, self.experts, weights, index).reshape(x.shape)


def _dispatch(flat, experts, weights, index):
    """Each token through its routed experts, weighted (the experts loop of HF's sequential MoE)."""
    out = torch.zeros_like(flat)
    for e, expert in enumerate(experts):
        token, slot = torch.where(index == e)
        out = out.index_add(0, token, expert(flat[token]) * weights[token, slot, None])
    return out


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.moe = SparseMoe()
        self.head = nn.Linear(HIDDEN, 8)

    def forward(self, x):
        h = self.proj(x)
        return self.head(h + self.moe(h))


def _model():
    torch.manual_seed(0)
    return Model().eval()


BATCHES = [torch.randn(2, 12, HIDDEN, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _loop(m):
    for x in BATCHES[1:]:
        m(x)


def _config(module, ratio, **options):
    cfg = copy.deepcopy(module.INT8_DEFAULT_CFG)
    cfg["algorithm"] = {"method": "max", "moe_calib_experts_ratio": ratio, **options}
    return cfg


def _amax(m):
    return {n: q.amax.float() for n, q in m.named_modules()
            if n.endswith("input_quantizer") and getattr(q, "amax", None) is not None}


def test_every_expert_sees_every_token_with_ratio_one_and_the_model_routes_as_before():
    plain, wide = _model(), _model()
    qpass.quantize(plain, _config(qpass, None), _loop)
    qpass.quantize(wide, _config(qpass, 1.0), _loop)
    a, b = _amax(plain), _amax(wide)
    assert a.keys() == b.keys()
    # the router sends each token to one expert; with ratio 1.0 each expert's fc1 also sees the rest
    flat = torch.cat([x.reshape(-1, HIDDEN) for x in BATCHES[1:]])
    h = plain.proj(flat).detach()  # proj's output, which every expert's fc1 then reads whole
    for e in range(EXPERTS):
        name = f"moe.experts.{e}.fc1.input_quantizer"
        torch.testing.assert_close(b[name], h.abs().amax(), rtol=1e-6, atol=0)
        assert b[name] >= a[name]
    assert any(b[n] > a[n] for n in a if ".experts." in n)
    for n in a:  # quantizers outside the experts see the same tokens either way
        if ".experts." not in n:
            assert torch.equal(a[n], b[n]), n
    assert wide.moe.gate.top_k == TOP_K
    # inference routes with top_k = 1: with the wide amax copied in, both models give the same output
    for n, q in plain.named_modules():
        if n in b:
            q.amax = b[n]
    with torch.no_grad():
        assert torch.equal(plain(BATCHES[0]), wide(BATCHES[0]))


class RouterMoe(nn.Module):
    """The router under the name ``router`` (Phi-MoE, GraniteMoE); ``fixed``: it only works with its
    own top_k (Phi-MoE's sparsemixer is top-2 only), so the raised top_k does not trace."""

    def __init__(self, fixed=False):
        super().__init__()
        self.router = Router()
        self.experts = nn.ModuleList(Expert() for _ in range(EXPERTS))
        self.fixed = fixed

    def forward(self, x):
        if self.fixed and self.router.top_k != TOP_K:
            raise NotImplementedError("this router routes to exactly one expert")
        flat = x.reshape(-1, x.shape[-1])
        _, weights, index = self.router(flat)
        return _dispatch(flat, self.experts, weights, index).reshape(x.shape)


@pytest.mark.parametrize("fixed", [False, True])
def test_a_router_named_router_and_one_that_cannot_route_wider(fixed):
    m = _model()
    state = {k.replace("gate.", "router."): v for k, v in m.moe.state_dict().items()}
    m.moe = RouterMoe(fixed)
    m.moe.load_state_dict(state)
    m.eval()
    if fixed:
        with pytest.warns(UserWarning, match=r"MoE block 'moe' does not trace with top_k=4 .*routed tokens only"):
            qpass.quantize(m, _config(qpass, 1.0), _loop)
    else:
        qpass.quantize(m, _config(qpass, 1.0), _loop)
    flat = torch.cat([x.reshape(-1, HIDDEN) for x in BATCHES[1:]])
    top = m.proj(flat).detach().abs().amax()
    got = [m.moe.experts[e].fc1.input_quantizer.amax for e in range(EXPERTS)]
    if fixed:  # the routed tokens only: no expert saw them all
        assert not all(torch.equal(g, top) for g in got)
    else:
        for g in got:
            torch.testing.assert_close(g, top, rtol=1e-6, atol=0)


@pytest.mark.skipif(not has_package("modelopt"), reason="nvidia-modelopt not installed")
@pytest.mark.parametrize("ratio,options", [(0.75, {}), (None, {}), (None, {"sync_expert_weight_amax": True})])
def test_matches_modelopt_on_sequential_experts(ratio, options):
    """ratio 0.75: each token also reaches 3 of the 4 experts; None: the experts share one input amax
    per quantizer name (and weight amax with sync_expert_weight_amax)."""
    import modelopt.torch.quantization as mtq

    ours, theirs = _model(), _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(theirs, _config(mtq, ratio, **options), _loop)
    qpass.quantize(ours, _config(qpass, ratio, **options), _loop)
    a = {n: q.amax.float() for n, q in theirs.named_modules()
         if n.endswith("_quantizer") and getattr(q, "amax", None) is not None}
    b = {n: q.amax.float() for n, q in ours.named_modules()
         if n.endswith("_quantizer") and getattr(q, "amax", None) is not None}
    assert a.keys() == b.keys() and len(a) == 2 * (2 + 2 * EXPERTS)
    shared = {b[f"moe.experts.{e}.fc2.input_quantizer"].item() for e in range(EXPERTS)}
    assert len(shared) == (EXPERTS if ratio else 1)
    for n in a:
        torch.testing.assert_close(b[n].reshape(a[n].shape), a[n], rtol=1e-6, atol=0, msg=n)
    with torch.no_grad():
        out, ref = ours(BATCHES[0]), theirs(BATCHES[0])
    assert nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.9999


@pytest.mark.parametrize("ratio", [0, 1.5, -0.5, True, "all"])
def test_bad_ratio_is_refused_before_any_work(ratio):
    m = _model()
    with torch.no_grad():
        ref = m(BATCHES[0])
    with pytest.raises(QuantConfigError, match=r"moe_calib_experts_ratio must be a number in \(0, 1\]"):
        qpass.quantize(m, _config(qpass, ratio), _loop)
    with torch.no_grad():
        assert torch.equal(m(BATCHES[0]), ref)


def test_an_expert_the_router_never_picks_takes_its_siblings_amax():
    """Before, max calibration refused the model (the expert's quantizers saw no data)."""
    m = _model()
    with torch.no_grad():
        m.moe.gate.weight[3] = -100.0  # expert 3 never wins the top-1 routing
    qpass.quantize(m, _config(qpass, None), _loop)
    for name in ("fc1", "fc2"):
        amax = [m.moe.experts[e].get_submodule(name).input_quantizer.amax for e in range(EXPERTS)]
        assert all(torch.equal(a, amax[0]) for a in amax[1:])
    # the weights keep their own amax unless asked
    w = [m.moe.experts[e].fc1.weight_quantizer.amax for e in range(EXPERTS)]
    assert not torch.equal(w[0], w[1])


@pytest.mark.parametrize("options,match", [
    ({"sync_expert_weight_amax": 1}, "sync_expert_weight_amax must be True or False"),
    ({"distributed_sync": "yes"}, "distributed_sync must be True or False"),
    ({"skip_forward_without_activation_calib": None}, "skip_forward_without_activation_calib must be True or False"),
    ({"shared_states": {"weight_global_amax": {"patterns": ["("]}}}, r"has an invalid regex '\('"),
    ({"shared_states": {"input_amax": {}}}, r"unknown state\(s\) \['input_amax'\]; expected keys from \['weight_global_amax'\]"),
])
def test_max_options_are_checked(options, match):
    m = _model()
    with torch.no_grad():
        ref = m(BATCHES[0])
    with pytest.raises(QuantConfigError, match=match):
        qpass.quantize(m, _config(qpass, None, **options), _loop)
    with torch.no_grad():
        assert torch.equal(m(BATCHES[0]), ref)


def test_a_model_without_moe_blocks_gets_a_warning():
    m = nn.Sequential(nn.Linear(HIDDEN, HIDDEN)).eval()
    with pytest.warns(UserWarning, match="no MoE block"):
        qpass.quantize(m, _config(qpass, 0.5), lambda mm: mm(BATCHES[0]))
