import copy
import io
import re

import pytest
import torch
import torch.nn.functional as F

import qpass
from conftest import tiny_bert, tiny_llama
from qpass.auto_quantize import (
    AutoQuantizeError, AutoQuantizeSearcher, auto_quantize, auto_quantize_report, auto_quantize_resolve,
    auto_quantize_sweep,
)
from qpass.auto_quantize.candidates import calib_steps, is_per_layer, make_candidates, planned_bits
from qpass.auto_quantize.units import units_of
from qpass.auto_quantize.search import SEARCH_ATTR

FORMATS = ["W4A8_AWQ_BETA_CFG", "FP8_DEFAULT_CFG", None]


def _data(n=2, vocab=128):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (2, 16), generator=g) for _ in range(n)]


def forward_step(model, batch):
    return model(input_ids=batch)


def loss_func(out, batch):
    logits = out.logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def _run(model, bits=6.0, **kw):
    kw = {"num_calib_steps": 2, "num_score_steps": 2, **kw}
    return auto_quantize(model, {"effective_bits": bits}, FORMATS, _data(), forward_step, loss_func, **kw)


@pytest.fixture(scope="module")
def searched():
    model = tiny_llama(tie=True)
    ids = _data()[0]
    emb = model.model.embed_tokens(ids).detach().clone()
    model, sd = _run(model)
    return model, sd, ids, emb


def test_budget_met_and_groups_consistent(searched):
    model, sd, _, _ = searched
    best = sd["best"]
    assert best["is_satisfied"] and best["effective_bits"] <= 6.0
    recipe = best["recipe"]
    assert "model.layers.0.self_attn.{q_proj,k_proj,v_proj}" in recipe
    assert "model.layers.0.mlp.{gate_proj,up_proj}" in recipe
    assert "lm_head" in recipe  # name-level rules (*lm_head*: off) are not applied in the search
    for name, stats in sd["candidate_stats"].items():
        describe = {model.get_submodule(p).weight_quantizer.describe() for p in stats["members"]}
        assert len(describe) == 1, name
        units = units_of(model)
        planned = [sum(planned_bits(c, units[p], model.get_submodule(p)) * model.get_submodule(p).weight.numel()
                       for p in stats["members"]) for c in make_candidates(FORMATS)]
        assert stats["costs"] == planned, name  # the budget pre-check uses the same costs as the solver
        assert len(stats["scores"]) == len(stats["costs"]) == 3
        assert stats["scores"][2] == 0.0 and stats["scores"][0] > stats["scores"][1] > 0


def test_tied_embedding_bit_identical(searched):
    model, _, ids, emb = searched
    assert torch.equal(model.model.embed_tokens(ids), emb)


def test_state_dict_round_trip(searched):
    _, sd, _, _ = searched
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert back["best"] == sd["best"] and back["candidate_stats"] == sd["candidate_stats"]
    assert len(back["score_history"]) == 2


def test_resolve_without_rescoring(searched, tmp_path):
    model, sd, ids, _ = searched
    sd = copy.deepcopy(sd)
    model, sd = auto_quantize_resolve(model, sd, {"effective_bits": 4.2})
    assert set(sd["best"]["recipe"].values()) == {"W4A8_AWQ_BETA_CFG"}
    assert sd["best"]["effective_bits"] == pytest.approx(4.125)
    out_low = model(input_ids=ids).logits
    model, sd = auto_quantize_resolve(model, sd, {"weight_memory_bytes": 10**9})
    assert set(sd["best"]["recipe"].values()) == {"None"}
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, out_low)
    with pytest.raises(AutoQuantizeError, match="minimum achievable is .*4.125"):
        auto_quantize_resolve(model, sd, {"effective_bits": 3.0})
    png = auto_quantize_report(sd, str(tmp_path / "heat.png"))
    assert (tmp_path / "heat.png").stat().st_size > 1000 and png.endswith(".png")
    rows = auto_quantize_sweep(model, sd, [3.0, 4.5, 8.0], lambda m: 1.0, str(tmp_path / "sweep.png"))
    assert [r[0] for r in rows] == [4.5, 8.0] and (tmp_path / "sweep.png").exists()
    auto_quantize_resolve(model, sd, {"effective_bits": 6.0})


def test_all_awq_matches_plain_quantize():
    """Every layer on W4A8 AWQ: the search's per-module slots reproduce qpass.quantize's model.

    Where AWQ folded 1/s into a norm the weights and amax are the same; where it folded 1/s into
    the rows of a previous Linear, the slot keeps it as that module's pre_quant_scale instead (so
    formats can be mixed), which quantizes the previous weight unscaled: close, not identical.
    """
    ref = tiny_llama(tie=False)
    model = copy.deepcopy(ref)
    data = _data()
    rules = [r for r in qpass.config.normalize_config("W4A8_AWQ_BETA_CFG")[0] if is_per_layer(r)]
    cfg = {"quant_cfg": rules, "algorithm": {"method": "awq_lite", "gptq": False}}  # as the candidates run it
    qpass.quantize(ref, cfg, lambda m: [forward_step(m, b) for b in data[:1]])  # AWQ: a quarter of 2 batches
    model, sd = _run(model, bits=4.2)
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"):
        r, m = ref.get_submodule(path), model.get_submodule(path)
        assert torch.equal(r.weight, m.weight)
        assert torch.equal(r.weight_quantizer[0].amax, m.weight_quantizer[0].amax)
        assert torch.equal(r.input_quantizer.amax, m.input_quantizer.amax)
    with torch.no_grad():
        a, b = ref(input_ids=data[0]).logits, model(input_ids=data[0]).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_awq_formats_calibrate_on_a_quarter_of_the_batches():
    awq, fp8, none = make_candidates(FORMATS)
    assert [calib_steps(awq, n) for n in (1, 4, 9, 512)] == [1, 1, 2, 128]
    assert calib_steps(fp8, 512) == calib_steps(none, 512) == 512


def test_kl_div_without_labels():
    model = tiny_bert()
    data = [{"input_ids": ids} for ids in _data()]
    model, sd = auto_quantize(model, {"effective_bits": 10.0}, ["INT8_DEFAULT_CFG", None], data,
                              num_calib_steps=2, num_score_steps=2, method="kl_div")
    assert sd["best"]["is_satisfied"] and sd["best"]["effective_bits"] <= 10.0
    assert "encoder.layer.0.attention.self.{query,key,value}" in sd["candidate_stats"]
    assert all(s["scores"][0] > 0 for s in sd["candidate_stats"].values())


def test_mlp_rule_appended():
    AutoQuantizeSearcher.rules.append(r"^(.*?)\.mlp")
    try:
        model, sd = _run(tiny_llama(layers=1, tie=False))
    finally:
        AutoQuantizeSearcher.rules.pop()
    assert "model.layers.0.mlp.{gate_proj,up_proj,down_proj}" in sd["candidate_stats"]


def test_missing_loss_is_an_error_before_work():
    model = tiny_llama(layers=1)
    with pytest.raises(AutoQuantizeError, match="needs loss_func.*or forward_backward_step"):
        auto_quantize(model, {"effective_bits": 6.0}, FORMATS, _data(), forward_step)
    assert not qpass.graph.quantized_model.is_quantized(model)


def test_no_grad_is_an_error_before_work():
    model = tiny_llama(layers=1)
    with torch.no_grad(), pytest.raises(AutoQuantizeError, match=re.escape("torch.no_grad()")):
        _run(model)
    assert not qpass.graph.quantized_model.is_quantized(model)


def test_nan_gradient_names_the_batch():
    def bad_loss(out, batch):
        return loss_func(out, batch) * (float("nan") if batch[0, 0] == batch_two[0, 0] else 1.0)

    data = _data(3)
    batch_two = data[1]
    model = tiny_llama(layers=1)
    with pytest.raises(AutoQuantizeError, match="score batch 1: the gradient"):
        auto_quantize(model, {"effective_bits": 6.0}, FORMATS, data, forward_step, bad_loss,
                      num_calib_steps=1, num_score_steps=3)
    assert not qpass.graph.quantized_model.is_quantized(model) and SEARCH_ATTR not in model.__dict__


def test_infeasible_budget_fails_before_calibration():
    """The minimum is known from the formats alone: only the tracing forward runs, the model is left as it was."""
    model = tiny_llama(layers=1)
    ref = copy.deepcopy(model)
    calls = []

    def counting_step(m, batch):
        calls.append(1)
        return forward_step(m, batch)

    with pytest.raises(AutoQuantizeError, match=r"minimum achievable is \{'effective_bits': 4.125\}"):
        auto_quantize(model, {"effective_bits": 3.0}, FORMATS, _data(), counting_step, loss_func,
                      num_calib_steps=2, num_score_steps=2)
    assert len(calls) == 1
    assert not qpass.graph.quantized_model.is_quantized(model) and SEARCH_ATTR not in model.__dict__
    assert type(model) is type(ref)
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n


def test_gradient_scores_equal_the_direct_estimate():
    """Each (group, format) score is sum over batches of (dL/dY * (Y_quant - Y))^2, Y_quant from that
    format's quantizers, computed here on the eager float model with autograd."""
    base = tiny_llama(tie=False)
    data = _data(1)
    model, sd = auto_quantize(copy.deepcopy(base), {"effective_bits": 12.0}, ["FP8_DEFAULT_CFG", None], data,
                              forward_step, loss_func, num_calib_steps=1, num_score_steps=1, fast_scores=False)
    _, fast = auto_quantize(copy.deepcopy(base), {"effective_bits": 12.0}, ["FP8_DEFAULT_CFG", None], data,
                            forward_step, loss_func, num_calib_steps=1, num_score_steps=1, fast_scores=True)
    search = model.__dict__[SEARCH_ATTR]
    seen = {}

    def keep(name):
        def hook(mod, args, out):
            out.retain_grad()
            seen[name] = (args[0].detach(), out)
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in base.named_modules() if n in search.slots]
    loss_func(forward_step(base, data[0]), data[0]).backward()
    for h in handles:
        h.remove()
    want = {}
    with torch.no_grad():
        for p, (x, y) in seen.items():
            slot = search.slots[p][0]
            yq = F.linear(slot.input_quantizer(x), slot.weight_quantizer(base.get_submodule(p).weight))
            want[p] = float(((y.grad * (yq - y)) ** 2).sum())
    assert len(want) == len(search.slots) > 0
    for stats in sd["candidate_stats"].values():
        ref = sum(want[p] for p in stats["members"])
        assert ref > 0
        assert stats["scores"][0] == pytest.approx(ref, rel=1e-4)
        assert stats["scores"][1] == 0.0
    # bfloat16 GEMMs (fast_scores): the same estimate up to their rounding (a few % on FP8 scores)
    for name, stats in fast["candidate_stats"].items():
        assert stats["scores"][0] == pytest.approx(sd["candidate_stats"][name]["scores"][0], rel=0.1)


def test_shared_input_members_quantize_their_input_once():
    """q/k/v (and gate/up) get identical input quantizers per format, so scoring quantizes their
    shared input once per batch; members whose quantizers differ never share."""
    from qpass.auto_quantize.scoring import _same_quantizer, _shared_input_keys

    model, sd, _, _ = _searched_tiny()
    search = model.__dict__[SEARCH_ATTR]
    groups = [st["members"] for st in sd["candidate_stats"].values()]
    keys = _shared_input_keys(search.slots, groups)
    assert keys[("model.layers.0.self_attn.k_proj", 0)] == "model.layers.0.self_attn.q_proj"
    assert keys[("model.layers.0.self_attn.v_proj", 1)] == "model.layers.0.self_attn.q_proj"
    assert keys[("model.layers.1.mlp.up_proj", 0)] == "model.layers.1.mlp.gate_proj"
    assert not any(k[0].endswith(("q_proj", "o_proj", "down_proj")) for k in keys)
    q = search.slots["model.layers.0.self_attn.q_proj"][1].input_quantizer
    other = copy.deepcopy(q)
    other.amax = q.amax * 2
    assert _same_quantizer(q, copy.deepcopy(q)) and not _same_quantizer(q, other)


def _searched_tiny():
    model = tiny_llama(tie=False)
    model, sd = _run(model)
    return model, sd, None, None


def test_max_candidate_reuses_the_awq_batches_input_maxima():
    """AWQ calibrates on the first quarter of the batches and records its inputs' channel maxima;
    the FP8 candidate then runs only the other batches, with the same amax as on all of them."""
    base = tiny_llama(tie=False)
    data = _data(4)
    calls = []

    def step(model, batch):
        calls.append(batch)
        return forward_step(model, batch)

    model, _ = auto_quantize(copy.deepcopy(base), {"effective_bits": 12.0}, FORMATS, data, step, loss_func,
                             num_calib_steps=4, num_score_steps=1)
    assert len(calls) == 1 + 3 + 1 + 1  # AWQ on batch 0, FP8 on batches 1-3, trace, one score batch
    ref = copy.deepcopy(base)
    rules = [r for r in qpass.config.normalize_config("FP8_DEFAULT_CFG")[0] if is_per_layer(r)]
    qpass.quantize(ref, {"quant_cfg": rules, "algorithm": "max"}, lambda m: [forward_step(m, b) for b in data])
    slots = model.__dict__[SEARCH_ATTR].slots
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        assert torch.equal(slots[path][1].input_quantizer.amax, ref.get_submodule(path).input_quantizer.amax), path


def test_max_candidate_the_record_does_not_cover_calibrates_on_every_batch():
    base = tiny_llama(tie=False)
    data = _data(4)
    per_channel = {"quant_cfg": {"*weight_quantizer": {"num_bits": 8, "axis": 0},
                                 "*input_quantizer": {"num_bits": 8, "axis": -1}}, "algorithm": "max"}
    model, _ = auto_quantize(copy.deepcopy(base), {"effective_bits": 12.0}, ["INT4_AWQ_CFG", per_channel, None],
                             data, forward_step, loss_func, num_calib_steps=4, num_score_steps=1)
    ref = copy.deepcopy(base)
    qpass.quantize(ref, per_channel, lambda m: [forward_step(m, b) for b in data])
    got = model.__dict__[SEARCH_ATTR].slots["model.layers.0.mlp.up_proj"][1].input_quantizer.amax
    assert got.numel() > 1 and torch.equal(got, ref.model.layers[0].mlp.up_proj.input_quantizer.amax)
