"""Distributed calibration: statistics reduced across 2 gloo ranks equal single-process calibration.

One spawn of two processes runs every scenario (starting torch twice is most of the cost); the
parent computes the single-process references and compares amax exactly.
"""

import datetime
import multiprocessing
import os

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import qpass
from qpass.errors import CalibrationError
from qpass.nn.tensor_quantizer import TensorQuantizer

WORLD = 2
TIMEOUT_S = 120  # the whole spawn; a hang fails the tests instead of blocking them


class Expert(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TwoExperts(nn.Module):
    """Sequence positions [:n1] go to expert e1, the rest to e0. ``n1=0``: e1 gets no tokens.

    ``n1`` is a constructor argument (so each rank can trace a different graph with the same
    quantizer names) and may be overridden per call (so one process can reproduce both routings).
    """

    def __init__(self, n1=3, d=16, h=24, extra=False):
        super().__init__()
        self.n1 = n1
        self.proj = nn.Linear(d, d)
        self.e0 = Expert(d, h)
        self.e1 = Expert(d, h)
        if extra:
            self.extra = nn.Linear(d, d)

    def forward(self, x, n1=None):
        n1 = self.n1 if n1 is None else n1
        h = self.proj(x)
        if hasattr(self, "extra"):
            h = self.extra(h)
        return torch.cat([self.e1(h[:, :n1]), self.e0(h[:, n1:])], dim=1)


def make_model(n1=3, extra=False):
    torch.manual_seed(0)
    return TwoExperts(n1, extra=extra).eval()


def make_data():
    g = torch.Generator().manual_seed(1)
    # Rank 1's half has the larger values, so the reduction must take them from it.
    return [torch.randn(b, 7, 16, generator=g) * s for b, s in ((2, 1.0), (3, 0.5), (2, 3.0), (1, 2.0))]


def shard(data, rank):
    k = len(data) // WORLD
    return data[rank * k:(rank + 1) * k]


def amax_dict(model):
    return {n: (None if m.amax is None else m.amax.clone())
            for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def bias_configs():
    per_tensor = {-1: None, -2: None, -3: None}
    inputs = lambda bias: {"quant_cfg": {"*": {"enable": False},  # noqa: E731
                                         "*weight_quantizer": {"num_bits": 8, "axis": 0},
                                         "*input_quantizer": {"num_bits": 8, "axis": None, "bias": bias}},
                           "algorithm": "max"}
    return {"bias_histogram": qpass.INT8_ASYMMETRIC_CFG,
            "bias_max_min": inputs({**per_tensor, "method": "max_min", "zero_point": True}),
            "bias_mean": inputs({**per_tensor, "method": "mean"})}


def capture_configs():
    """Algorithms whose searches read captured inputs (per-channel maxima, samples, Hessians)."""
    gptq = {"quant_cfg": {"*": {"enable": False}, "*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 8}}},
            "algorithm": "gptq"}
    return {"smoothquant": qpass.INT8_SMOOTHQUANT_CFG, "awq_lite": qpass.NVFP4_AWQ_LITE_CFG, "gptq": gptq,
            "local_hessian": qpass.NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG}


def model_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bias_dict(model):
    return {n: (m.bias_value.clone(), m.amax.clone()) for n, m in model.named_modules()
            if isinstance(m, TensorQuantizer) and m.bias_value is not None}


def _worker(rank, store_path, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        mine = shard(make_data(), rank)
        loop = lambda m: [m(b) for b in mine]  # noqa: E731

        model = make_model(3)  # every rank routes the same way
        qpass.quantize(model, qpass.INT8_DEFAULT_CFG, loop)
        result = {"even": amax_dict(model)}

        model = make_model(3)  # distributed_sync=False: each rank keeps its own statistics
        qpass.quantize(model, {**qpass.INT8_DEFAULT_CFG, "algorithm": {"method": "max", "distributed_sync": False}},
                       loop)
        result["no_sync"] = amax_dict(model)

        model = make_model(3 if rank == 0 else 0)  # rank 1: expert e1 sees no tokens
        qpass.quantize(model, qpass.INT8_DEFAULT_CFG, loop)
        result["empty_expert"] = amax_dict(model)
        result["empty_expert_batches"] = model.e1.fc1.input_quantizer.calibrator.num_batches

        model = make_model(3, extra=(rank == 1))  # different quantizer names: every rank must raise
        try:
            qpass.quantize(model, qpass.INT8_DEFAULT_CFG, loop)
            result["mismatch"] = None
        except CalibrationError as e:
            result["mismatch"] = str(e)
        result["plugin"] = _plugin_kind(rank)
        for key, cfg in bias_configs().items():  # affine biases: reduced like the amax
            model = make_model(3)
            qpass.quantize(model, cfg, loop)
            result[key] = bias_dict(model)
        for key, cfg in capture_configs().items():  # searches on captured activations
            for variant in ("even", "mixed"):  # mixed: rank 1's expert e1 sees no tokens
                model = make_model(3 if variant == "even" or rank == 0 else 0)
                qpass.quantize(model, cfg, loop)
                result[f"{key}/{variant}"] = model_state(model)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


class HistStats:
    """A histogram-like statistic kind, plugged in as a later calibrator would be."""

    bins = 4

    def __init__(self, values):
        self.values = values  # raw |x| seen on this rank (None: no data)
        self.counts = None
        self.hi = None


def _plugin_kind(rank):
    """Registry contract: agree on the range (MAX), re-bin, SUM counts; ranks without data join in."""
    from qpass.calib import distributed as qd

    stats = {"a": HistStats(torch.tensor([0.5, 3.0]) if rank == 0 else torch.tensor([1.0, 7.0, 6.5])),
             "b": HistStats(torch.tensor([2.0, 0.1]) if rank == 1 else None),  # only rank 1 has data
             "c": HistStats(None)}  # nobody has data

    @qd.register_reducer(HistStats)
    def _reduce(items, comm):
        local_hi = [None if it.obj.values is None else it.obj.values.max().reshape(1) for it in items]
        his = comm.all_reduce_optional(local_hi, comm.dist.ReduceOp.MAX, devices=[it.device for it in items],
                                       names=[it.name for it in items])
        counts = []
        for it, hi in zip(items, his):
            it.obj.hi = hi
            v = it.obj.values
            counts.append(None if v is None else torch.histc(v, HistStats.bins, 0, float(hi)).to(torch.int64))
        for it, c in zip(items, comm.all_reduce_optional(counts, comm.dist.ReduceOp.SUM)):
            it.obj.counts = c

    holder = nn.Module()  # stands in for a model whose statistics live outside its quantizers
    qd.register_source(lambda m: [qd.StatItem(k, v, torch.device("cpu")) for k, v in stats.items()]
                       if m is holder else [])
    qd.reduce_statistics(holder)
    out = {k: (v.hi, v.counts) for k, v in stats.items()}

    # A statistic only rank 0 has, of a dtype that cannot be reduced: every rank raises, none hangs.
    odd = nn.Module()
    bad = HistStats(torch.tensor([True]) if rank == 0 else None)
    qd.register_source(lambda m: [qd.StatItem("bool_stat", bad, torch.device("cpu"))] if m is odd else [])
    try:
        qd.reduce_statistics(odd)
        out["unsupported"] = None
    except CalibrationError as e:
        out["unsupported"] = str(e)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp / "store"), str(tmp))) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=TIMEOUT_S)
    for p in procs:
        p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
    assert not hung, f"ranks {hung} did not finish within {TIMEOUT_S} s (a collective hung?)"
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}"
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_same_amax(got, want):
    assert got.keys() == want.keys()
    for name in want:
        a, b = got[name], want[name]
        assert (a is None) == (b is None), name
        if b is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name


def test_two_ranks_equal_single_process_on_union(ranks, one_thread):
    data = make_data()
    ref = make_model(3)
    qpass.quantize(ref, qpass.INT8_DEFAULT_CFG, lambda m: [m(b) for b in data])
    want = amax_dict(ref)
    assert want["e1.fc1.input_quantizer"] is not None
    for r in range(WORLD):
        assert_same_amax(ranks[r]["even"], want)
    # Each rank alone would have calibrated differently: the reduction did something.
    alone = make_model(3)
    qpass.quantize(alone, qpass.INT8_DEFAULT_CFG, lambda m: [m(b) for b in shard(data, 0)])
    assert not torch.equal(amax_dict(alone)["proj.input_quantizer"], want["proj.input_quantizer"])


def test_distributed_sync_false_keeps_each_ranks_own_amax(ranks, one_thread):
    data = make_data()
    for r in range(WORLD):
        alone = make_model(3)
        qpass.quantize(alone, qpass.INT8_DEFAULT_CFG, lambda m: [m(b) for b in shard(data, r)])
        assert_same_amax(ranks[r]["no_sync"], amax_dict(alone))
    assert not torch.equal(ranks[0]["no_sync"]["proj.input_quantizer"], ranks[1]["no_sync"]["proj.input_quantizer"])


def test_expert_without_tokens_on_one_rank_completes_and_matches(ranks, one_thread):
    data = make_data()
    # Rank 1 alone cannot calibrate: its e1 expert never sees a token.
    alone = make_model(0)
    with pytest.raises(CalibrationError, match="e1.fc1.input_quantizer"):
        qpass.quantize(alone, qpass.INT8_DEFAULT_CFG, lambda m: [m(b) for b in shard(data, 1)])
    # Single process, each half routed as on its rank.
    ref = make_model(3)
    qpass.quantize(ref, qpass.INT8_DEFAULT_CFG,
                   lambda m: [m(b) for b in shard(data, 0)] + [m(b, n1=0) for b in shard(data, 1)])
    want = amax_dict(ref)
    for r in range(WORLD):
        assert_same_amax(ranks[r]["empty_expert"], want)
        assert ranks[r]["empty_expert_batches"] == len(shard(data, 0))  # only rank 0's batches reached it


def test_mismatched_models_raise_on_every_rank(ranks):
    for r in range(WORLD):
        msg = ranks[r]["mismatch"]
        assert msg is not None and "ranks disagree" in msg and "extra.input_quantizer" in msg


def test_plugged_in_kind_reduces_like_the_union(ranks):
    union = {"a": torch.tensor([0.5, 3.0, 1.0, 7.0, 6.5]), "b": torch.tensor([2.0, 0.1])}
    for r in range(WORLD):
        got = ranks[r]["plugin"]
        for k, v in union.items():
            hi, counts = got[k]
            assert torch.equal(hi, v.max().reshape(1))
            assert torch.equal(counts, torch.histc(v, HistStats.bins, 0, float(v.max())).to(torch.int64))
        assert got["c"] == (None, None)
        assert "bool_stat" in got["unsupported"] and "cannot be reduced" in got["unsupported"]


@pytest.mark.parametrize("key", ["bias_histogram", "bias_max_min", "bias_mean"])
def test_affine_biases_are_reduced_across_ranks(ranks, one_thread, key):
    """Both ranks get one bias and amax per quantizer, those of the union of their data: the
    extremes exactly, the mean of batch means to float rounding, the histogram range search on
    the summed (re-binned) histograms close to the single-process one."""
    got0, got1 = ranks[0][key], ranks[1][key]
    assert got0.keys() == got1.keys() and len(got0) > 0
    for name in got0:
        assert torch.equal(got0[name][0], got1[name][0]) and torch.equal(got0[name][1], got1[name][1]), name
    data = make_data()
    ref = make_model(3)
    qpass.quantize(ref, bias_configs()[key], lambda m: [m(b) for b in data])
    want = bias_dict(ref)
    assert want.keys() == got0.keys()
    for name, (bias, amax) in want.items():
        got_bias, got_amax = got0[name]
        if key == "bias_max_min":  # the range's midpoint: exact (the amax depends on batch order)
            torch.testing.assert_close(got_bias, bias, rtol=0, atol=0)
        elif key == "bias_mean":
            torch.testing.assert_close(got_bias, bias, rtol=1e-5, atol=1e-6)
        else:  # two ranks' histograms re-binned onto one grid: the same range to a few bins
            step = float(amax) / 127
            assert abs(float(got_bias.flatten()[0]) - float(bias.flatten()[0])) <= 3 * step, name
            torch.testing.assert_close(got_amax, amax, rtol=0.03, atol=0)


@pytest.mark.parametrize("key", sorted(capture_configs()))
def test_searches_on_captured_inputs_agree_across_ranks(ranks, one_thread, key):
    """Captured statistics (maxima, sums, token samples, Hessians) are reduced before the
    searches, so every rank ends with the same model, also when one rank saw no tokens for an
    expert. Each rank's own half alone gives another model (so without the reduction they differ)."""
    for variant in ("even", "mixed"):
        a, b = ranks[0][f"{key}/{variant}"], ranks[1][f"{key}/{variant}"]
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{key}/{variant}: ranks differ in {differ[:4]}"
    halves = []
    for r in range(WORLD):
        model = make_model(3)
        mine = shard(make_data(), r)
        qpass.quantize(model, capture_configs()[key], lambda m: [m(x) for x in mine])
        halves.append(model_state(model))
    assert any(not torch.equal(halves[0][k], halves[1][k]) for k in halves[0])
