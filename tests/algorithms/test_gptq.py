"""GPTQ: the solver against known answers, the algorithm end to end, options and failures."""

import copy
import re

import pytest
import torch
from torch import nn

import qpass
from qpass.algorithms.gptq_solve import damped_inverse_factor, gptq_quantize
from qpass.calib.hessian import HessianCapture
from qpass.errors import QuantConfigError
from qpass.formats import QuantSpec
from qpass.formats.columns import ColumnGrid
from qpass.graph.quantized_model import state_of

from conftest import counting_loop, needs_smollm2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

INT4_B16 = dict(num_bits=4, block_sizes={-1: 16})


def _correlated_inputs(n=512, c=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=g) / c ** 0.5 + torch.eye(c)
    return torch.randn(n, c, generator=g) @ mix


def _spec_and_amax(w, **attrs):
    spec = QuantSpec.from_attributes(**attrs)
    return spec, (spec.amax_of(w) if spec.needs_amax else None)


def _gptq(w, x, perc_damp=0.01, block_size=16, **attrs):
    spec, amax = _spec_and_amax(w, **attrs)
    u = damped_inverse_factor(2 * x.t() @ x / x.shape[0], perc_damp)
    return gptq_quantize(w, u, ColumnGrid(spec, w, amax), block_size), spec, amax


def _obq_reference(w, h, spec, amax, perc_damp):
    """Textbook one-column-at-a-time GPTQ/OBQ with the explicit inverse Hessian (no Cholesky, no blocks)."""
    w = w.double().clone()
    h = h.double().clone()
    h += perc_damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    grid = ColumnGrid(spec, w.float(), amax)
    for j in range(w.shape[1]):
        q = grid.quantize(w[:, j].float(), j).double()
        err = (w[:, j] - q) / hinv[j, j]
        w[:, j] = q
        w[:, j + 1:] -= err[:, None] * hinv[j, j + 1:][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return w.float()


@pytest.mark.parametrize("attrs", [INT4_B16, dict(num_bits=8, axis=0), dict(num_bits=(4, 3))])
def test_gptq_matches_the_textbook_update(attrs):
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    x = _correlated_inputs()
    h = 2 * x.t() @ x / x.shape[0]
    ours, spec, amax = _gptq(w, x, **attrs)
    ref = _obq_reference(w, h, spec, amax, 0.01)
    # the same rounding decisions; a rare near-tie may flip in the last bit of the update
    assert (ours == ref).float().mean() > 0.99
    assert torch.equal(spec.fake_quant(ours, amax), ours)


@pytest.mark.parametrize("attrs", [INT4_B16, dict(num_bits=8, axis=0), dict(num_bits=(4, 3)),
                                   dict(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)}),
                                   dict(num_bits=(2, 1), block_sizes={-1: 32, "type": "dynamic", "scale_bits": (8, 0)})])
def test_gptq_output_error_is_at_most_round_to_nearest(attrs):
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    x = _correlated_inputs(seed=1)
    q, spec, amax = _gptq(w, x, block_size=32, **attrs)
    rtn = spec.fake_quant(w, amax)
    err = lambda v: (x @ (v - w).t()).pow(2).mean().item()  # noqa: E731
    assert err(q) < 0.8 * err(rtn)


@pytest.mark.parametrize("diag", ["identity", "diagonal"])
def test_gptq_with_a_diagonal_hessian_is_round_to_nearest(diag):
    torch.manual_seed(2)
    w = torch.randn(16, 48)
    h = torch.eye(48) if diag == "identity" else torch.diag(torch.rand(48) * 5 + 0.1)
    for attrs in (INT4_B16, dict(num_bits=8, axis=0), dict(num_bits=(4, 3))):
        spec, amax = _spec_and_amax(w, **attrs)
        q = gptq_quantize(w, damped_inverse_factor(h, 0.01), ColumnGrid(spec, w, amax), 16)
        assert torch.equal(q, spec.fake_quant(w, amax)), attrs


def test_more_damping_moves_gptq_toward_round_to_nearest():
    torch.manual_seed(3)
    w = torch.randn(32, 64)
    x = _correlated_inputs(seed=3)
    spec, amax = _spec_and_amax(w, **INT4_B16)
    rtn = spec.fake_quant(w, amax)
    differ = {}
    for d in (0.001, 0.1, 1.0):
        q, _, _ = _gptq(w, x, perc_damp=d, **INT4_B16)
        differ[d] = int((q != rtn).sum())
    assert differ[0.001] > differ[0.1] > differ[1.0] > 0


def test_block_size_is_a_lazy_batch_of_the_same_update():
    torch.manual_seed(4)
    w = torch.randn(32, 64)
    x = _correlated_inputs(seed=4)
    results = [_gptq(w, x, block_size=b, **INT4_B16)[0] for b in (16, 32, 64)]
    for r in results[1:]:
        assert (r == results[0]).float().mean() > 0.99


def test_dead_input_channels_are_rounded_to_nearest():
    torch.manual_seed(5)
    w = torch.randn(8, 32)
    x = _correlated_inputs(c=32, seed=5)
    x[:, 16:] = 0.0
    q, spec, amax = _gptq(w, x, **INT4_B16)
    assert torch.isfinite(q).all()
    assert torch.equal(q[:, 16:], spec.fake_quant(w, amax)[:, 16:])


# ---------------------------------------------------------------------------- end to end
class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _cfg(name, **options):
    cfg = copy.deepcopy(getattr(qpass, name))
    cfg["algorithm"] = {"method": "gptq", **options}
    return cfg


WEIGHT_FORMATS = ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG",
                  "MXFP4_DEFAULT_CFG", "W4A8_AWQ_BETA_CFG", "INT8_WEIGHT_ONLY_CFG"]


@pytest.mark.parametrize("name", WEIGHT_FORMATS)
def test_gptq_weights_are_fixed_points_and_beat_max(name):
    torch.manual_seed(6)
    base = TwoLinears().eval()
    x = _correlated_inputs(n=256, seed=6)
    ref = base(x)
    errs = {}
    for algo in ("max", "gptq"):
        m = copy.deepcopy(base)
        cfg = copy.deepcopy(getattr(qpass, name))
        cfg["algorithm"] = {"method": "gptq", "block_size": 32} if algo == "gptq" else "max"
        loop, calls = counting_loop([x[:128], x[128:]])
        qpass.quantize(m, cfg, loop)
        if algo == "gptq":
            assert len(calls) == 1
            for lin in (m.fc1, m.fc2):
                assert torch.equal(lin.weight_quantizer(lin.weight), lin.weight)
            assert [r.path for r in state_of(m).gptq] == ["fc1", "fc2"]
        errs[algo] = (m(x) - ref).pow(2).mean().item()
    assert errs["gptq"] < errs["max"], errs


def test_shared_inputs_share_one_hessian(attention):
    x = torch.randn(4, 8, 32)
    mods = {p: attention.get_submodule(p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    qpass.quantize(attention, {"quant_cfg": {"*weight_quantizer": {"num_bits": 8, "axis": 0}}, "algorithm": None})
    with HessianCapture(mods) as cap:
        attention(x)
    st = cap.stats
    assert st["q_proj"] is st["k_proj"] is st["v_proj"] and st["o_proj"] is not st["q_proj"]
    h = attention.norm(x).reshape(-1, 32)
    torch.testing.assert_close(st["q_proj"].xtx, h.t() @ h, rtol=1e-5, atol=1e-4)
    assert st["q_proj"].tokens == 32


def test_tied_lm_head_is_untied_and_the_embedding_kept():
    model = tiny_llama(2, tie=True)
    emb = model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 128, (2, 24))
    cfg = _cfg("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", block_size=64)
    cfg["quant_cfg"] = [e for e in cfg["quant_cfg"] if "lm_head" not in str(e.get("quantizer_name"))]
    qpass.quantize(model, cfg, lambda m: m(input_ids=ids))
    results = {r.path: r for r in state_of(model).gptq}
    assert results["lm_head"].untied and not results["model.layers.0.mlp.up_proj"].untied
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, emb)
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_every_preset_runs_with_gptq():
    base = tiny_llama(2)
    ids = torch.randint(0, 128, (2, 16))
    ran = 0
    for name in sorted(qpass.config.choices):
        model = copy.deepcopy(base)
        try:
            qpass.quantize(model, _cfg(name, block_size=64), lambda m: m(input_ids=ids))
        except QuantConfigError as e:
            assert re.search("not implemented yet|not supported", str(e)), (name, e)
            continue
        ran += 1
        assert torch.isfinite(model(input_ids=ids).logits).all(), name
        for r in state_of(model).gptq:
            lin = model.get_submodule(r.path)
            assert torch.equal(lin.weight_quantizer(lin.weight), lin.weight), (name, r.path)
    assert ran >= 30


def test_layerwise_runs_one_pass_per_decoder_layer():
    base = tiny_llama(2)
    ids = torch.randint(0, 128, (2, 16))
    calls = []
    model = copy.deepcopy(base)
    qpass.quantize(model, _cfg("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", block_size=64, layerwise={"enable": True}),
                   lambda m: calls.append(m(input_ids=ids)))
    assert len(calls) == 2
    one = copy.deepcopy(base)
    qpass.quantize(one, _cfg("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", block_size=64), lambda m: m(input_ids=ids))
    # the first layer sees the same inputs either way; later layers see quantized predecessors
    first = "model.layers.0.self_attn.q_proj"
    assert torch.equal(model.get_submodule(first).weight, one.get_submodule(first).weight)
    last = "model.layers.1.mlp.down_proj"
    assert not torch.equal(model.get_submodule(last).weight, one.get_submodule(last).weight)


@pytest.mark.parametrize("options,words", [
    ({"perc_damp": 0.0}, ["perc_damp", "(0, 1]"]),
    ({"perc_damp": 1.5}, ["perc_damp"]),
    ({"block_size": 0}, ["block_size", "positive integer"]),
    ({"block_size": True}, ["block_size"]),
    ({"fused": "yes"}, ["fused", "True or False"]),
    ({"layerwise": {"enable": True, "checkpoint_dir": "/tmp"}}, ["checkpoint_dir", "not implemented"]),
    ({"damp": 0.1}, ["'damp'", "perc_damp", "block_size"]),
])
def test_bad_options_are_refused_before_any_work(mlp, options, words):
    x = torch.randn(4, 32)
    ref = mlp(x)
    with pytest.raises(QuantConfigError) as e:
        qpass.quantize(mlp, _cfg("INT8_DEFAULT_CFG", **options), lambda m: m(x))
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert type(mlp).__name__ == "MLP" and torch.equal(mlp(x), ref)


def test_block_size_not_a_multiple_of_the_nvfp4_block_names_the_module(mlp):
    x = torch.randn(4, 32)
    w = mlp.fc1.weight.detach().clone()
    with pytest.raises(QuantConfigError, match=r"block_size=24 .* multiple of the weight block size 16 of 'fc1"):
        qpass.quantize(mlp, _cfg("NVFP4_DEFAULT_CFG", block_size=24), lambda m: m(x))
    assert torch.equal(mlp.fc1.weight, w)


def test_fused_gives_the_same_weights(mlp):
    x = torch.randn(16, 32)
    a, b = copy.deepcopy(mlp), copy.deepcopy(mlp)
    qpass.quantize(a, _cfg("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", block_size=32), lambda m: m(x))
    qpass.quantize(b, _cfg("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", block_size=32, fused=True), lambda m: m(x))
    assert torch.equal(a.fc1.weight, b.fc1.weight) and torch.equal(a.fc2.weight, b.fc2.weight)


def test_gptq_without_data_is_an_error(mlp):
    with pytest.raises(qpass.errors.CalibrationError, match="gptq needs calibration data"):
        qpass.quantize(mlp, _cfg("INT4_BLOCKWISE_WEIGHT_ONLY_CFG"))


def test_save_restore_of_a_gptq_model_is_bit_identical(tmp_path, mlp):
    x = torch.randn(16, 32)
    fresh = copy.deepcopy(mlp)
    qpass.quantize(mlp, _cfg("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", block_size=32), lambda m: m(x))
    qpass.save(mlp, tmp_path / "m.qpass")
    qpass.restore(fresh, tmp_path / "m.qpass")
    assert torch.equal(fresh(x), mlp(x))


@pytest.mark.real_model
@needs_smollm2
def test_gptq_on_smollm2_two_layers_beats_max():
    from qpass import zoo

    base, tok = zoo.load_smollm2(2)
    split = zoo.text_split()
    # more calibration tokens (2048) than the widest layer input (1536): a full-rank Hessian
    calib = zoo.token_windows(tok, split.calib, 8, 256)
    evals = zoo.token_windows(tok, split.held_out, 2, 128)
    with torch.no_grad():
        ref = base(input_ids=evals).logits
    errs = {}
    for algo in ("max", "gptq"):
        m = copy.deepcopy(base)
        cfg = copy.deepcopy(qpass.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
        cfg["algorithm"] = algo
        loop, calls = counting_loop([calib])
        qpass.quantize(m, cfg, loop)
        with torch.no_grad():
            errs[algo] = (m(input_ids=evals).logits - ref).pow(2).mean().item()
    assert errs["gptq"] < 0.9 * errs["max"], errs


def test_calibrate_with_gptq_after_quantize(mlp):
    x = torch.randn(64, 32)
    ref = mlp(x)
    qpass.quantize(mlp, qpass.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    rtn = (mlp(x) - ref).pow(2).mean()
    w = mlp.fc1.weight.detach().clone()
    qpass.calibrate(mlp, {"method": "gptq", "block_size": 32}, lambda m: m(x))
    assert not torch.equal(mlp.fc1.weight, w)
    assert (mlp(x) - ref).pow(2).mean() < rtn


def test_act_order_equals_the_textbook_update_on_permuted_columns():
    """act_order rounds the columns in order of decreasing Hessian diagonal: the same as the
    textbook update run on the permuted weight and Hessian, with each column keeping its own
    (static) grid, then un-permuted."""
    torch.manual_seed(0)
    x = _correlated_inputs() * torch.linspace(0.1, 3.0, 64)
    w = torch.randn(12, 64)
    spec, amax = _spec_and_amax(w, **INT4_B16)
    h = 2 * x.t() @ x / x.shape[0]
    perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    u = damped_inverse_factor(h[perm][:, perm], 0.01)
    got = gptq_quantize(w, u, ColumnGrid(spec, w, amax), 16, perm)
    assert torch.equal(spec.fake_quant(got, amax), got)  # on the original grid

    class Permuted:  # the grid of column perm[j] for permuted column j
        def __init__(self):
            self.inner = ColumnGrid(spec, w, amax)

        def quantize(self, column, col):
            return self.inner.quantize(column, int(perm[col]))

    ref = w.double()[:, perm].clone()
    hp = h.double()[perm][:, perm]
    hp += 0.01 * hp.diagonal().mean() * torch.eye(64, dtype=hp.dtype)
    hinv = torch.linalg.inv(hp)
    grid = Permuted()
    for j in range(64):
        q = grid.quantize(ref[:, j].float(), j).double()
        err = (ref[:, j] - q) / hinv[j, j]
        ref[:, j] = q
        ref[:, j + 1:] -= err[:, None] * hinv[j, j + 1:][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    ref = ref.float()[:, torch.argsort(perm)]
    assert (got != ref).float().mean() < 0.01  # float32 vs float64: rare rounding ties differ
    with pytest.raises(ValueError, match="static grid"):
        nvfp4 = QuantSpec.from_attributes(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)})
        gptq_quantize(w, u, ColumnGrid(nvfp4, w, w.abs().max()), 16, perm)


def test_act_order_is_the_default_and_lowers_the_output_error():
    torch.manual_seed(0)
    base = tiny_llama(2)
    ids = [torch.randint(0, 128, (4, 32)) for _ in range(2)]
    with torch.no_grad():
        ref = [base(i).logits for i in ids]
    errs = {}
    for act_order in (False, True, None):
        m = copy.deepcopy(base)
        opts = {"block_size": 64} if act_order is None else {"block_size": 64, "act_order": act_order}
        qpass.quantize(m, _cfg("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", **opts), lambda mm: [mm(i) for i in ids])
        with torch.no_grad():
            errs[act_order] = sum(float((m(i).logits - r).pow(2).mean()) for i, r in zip(ids, ref))
    assert errs[None] == errs[True] < errs[False]
    with pytest.raises(QuantConfigError, match="act_order"):
        qpass.quantize(copy.deepcopy(base), _cfg("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", act_order=1), lambda mm: mm(ids[0]))
