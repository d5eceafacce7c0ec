"""HistogramCalibrator (calibrator: "histogram"): percentile, entropy and mse amax."""

import copy
import warnings

import pytest
import torch

import qpass
from qpass.calib.histogram import HistogramCalibrator, calibrate_histogram
from qpass.errors import CalibrationError, QuantConfigError
from qpass.nn.tensor_quantizer import TensorQuantizer

from conftest import MLP, has_package, needs_minilm
from conftest import minilm_calibration_case

needs_modelopt = pytest.mark.skipif(not has_package("modelopt"), reason="nvidia-modelopt not installed")


def outlier_tensor(n=200_000, outliers=20, value=1000.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[torch.randperm(n, generator=g)[:outliers]] = value
    return x


def calibrated(x, num_bits=8, **kw):
    cal = HistogramCalibrator(num_bits, **kw)
    for chunk in x.split(len(x) // 4):
        cal.collect(chunk)
    return cal


# ---------------------------------------------------------------------- known answers
def test_percentile_ignores_outliers():
    cal = calibrated(outlier_tensor())
    amax = float(cal.compute_amax("percentile", percentile=99.9))
    assert 2.5 < amax < 4.0  # |N(0,1)| 99.9th percentile is 3.29; bins are 1000/2048 wide, left edge
    assert float(cal.compute_amax("percentile", percentile=100)) == pytest.approx(1000, rel=1e-3)  # last bin's left edge


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_entropy_and_mse_clip_a_heavy_tail(method):
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((200_000,))  # max |x| ~ 660, 99.9% below ~32
    amax = float(calibrated(x).compute_amax(method))
    assert 0 < amax < 0.7 * float(x.abs().max())


def test_entropy_keeps_an_isolated_spike():
    # TensorRT/ModelOpt semantics: folding the clipped tail onto an empty bin gives infinite KL,
    # so a lone spike of outliers far from the bulk is kept (ModelOpt returns 1000 here too).
    assert float(calibrated(outlier_tensor()).compute_amax("entropy")) == pytest.approx(1000, rel=1e-3)


def test_percentile_exact_on_uniform_grid():
    # 1000 values on bin centres of 0..10: the 50th percentile is the left edge of bin 1024
    x = (torch.arange(2048) + 0.5) * (10 / 2048)
    cal = HistogramCalibrator(num_bins=2048)
    cal.collect(torch.cat([x, torch.tensor([10.0])]))
    assert float(cal.compute_amax("percentile", percentile=50)) == pytest.approx(5.0, rel=1e-5)


def test_range_grows_with_fixed_width():
    cal = HistogramCalibrator(num_bins=100)
    cal.collect(torch.linspace(-1, 1, 1001))
    width = float(cal._width)
    cal.collect(torch.tensor([3.0]))
    assert float(cal._width) == width and cal._hist.numel() == 300
    assert float(cal._hist.sum()) == 1002
    # ModelOpt returns the left edge of the bin where the percentile is reached
    assert float(cal.compute_amax("percentile", percentile=100)) == pytest.approx(3.0 - width, rel=1e-4)


def test_state_align_and_sum_like_a_reduction():
    a, b = HistogramCalibrator(num_bins=512), HistogramCalibrator(num_bins=512)
    full = HistogramCalibrator(num_bins=512)
    xa, xb = torch.randn(50_000), 3 * torch.randn(50_000)
    a.collect(xa), b.collect(xb)
    top = torch.maximum(a.state()["range"], b.state()["range"])
    a.align(top), b.align(top)
    hist = a.state()["hist"] + b.state()["hist"]
    a.load_state({"hist": hist, "range": top})
    full.collect(torch.cat([xa, xb]))
    assert float(a.state()["hist"].sum()) == 100_000
    p_red, p_full = float(a.compute_amax("percentile", percentile=99)), float(full.compute_amax("percentile", percentile=99))
    assert p_red == pytest.approx(p_full, rel=0.02)


def test_errors_are_clear():
    cal = calibrated(torch.randn(1000))
    with pytest.raises(QuantConfigError, match="unknown method"):
        cal.compute_amax("kl")
    with pytest.raises(QuantConfigError, match="percentile"):
        cal.compute_amax("percentile", percentile=101)
    with pytest.raises(CalibrationError, match="needs a method"):
        cal.compute_amax()
    with pytest.raises(QuantConfigError, match="integer format"):
        calibrated(torch.randn(1000), (4, 3)).compute_amax("entropy")
    with pytest.raises(QuantConfigError, match="per-tensor"):
        HistogramCalibrator(8, axis=0)
    assert HistogramCalibrator().compute_amax("percentile") is None


def test_quantizer_creates_histogram_calibrator_and_rejects_per_channel():
    q = TensorQuantizer({"num_bits": 8, "calibrator": "histogram"}, name="x.input_quantizer")
    assert isinstance(q.calibrator, HistogramCalibrator)
    with pytest.raises(QuantConfigError, match="x.weight_quantizer.*per-tensor"):
        TensorQuantizer({"num_bits": 8, "axis": 0, "calibrator": "histogram"}, name="x.weight_quantizer")
    q.enable_calib()
    q.disable_quant()
    with pytest.raises(CalibrationError, match="x.input_quantizer.*NaN"):
        q(torch.tensor([1.0, float("nan")]))
    q(torch.randn(100))
    with pytest.raises(CalibrationError, match="x.input_quantizer.*needs a method"):
        q.load_calib_amax()
    assert q.load_calib_amax("percentile", percentile=99.0) and q.amax.dim() == 0


def test_on_cuda_when_available():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = outlier_tensor()
    cpu, gpu = calibrated(x), calibrated(x.cuda())
    for m in ("percentile", "entropy", "mse"):
        a, b = cpu.compute_amax(m), gpu.compute_amax(m)
        assert b.device.type == "cuda"
        assert float(b) == pytest.approx(float(a), rel=1e-3)


# ---------------------------------------------------------------------- against ModelOpt
def _batches(seed, relu=False, outliers=0.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(3):  # growing spread: the range grows across batches
        x = torch.randn(4000, generator=g) * (1 + 0.5 * i)
        x = x + (torch.rand(4000, generator=g) < 0.002).float() * outliers
        out.append(torch.relu(x) if relu else x)
    return out


@needs_modelopt
@pytest.mark.parametrize("num_bits,unsigned,seed,relu,outliers", [
    (8, False, 0, False, 0.0), (8, False, 1, False, 25.0), (4, False, 2, False, 10.0),
    (8, True, 3, True, 0.0), ((4, 3), False, 4, False, 10.0),
])
def test_percentile_and_entropy_match_modelopt(num_bits, unsigned, seed, relu, outliers):
    from modelopt.torch.quantization.calib.histogram import HistogramCalibrator as MOHistogram

    batches = _batches(seed, relu, outliers)
    # 512 bins keep ModelOpt's Python-loop entropy search to about a second
    ours = HistogramCalibrator(num_bits, None, unsigned, num_bins=512)
    theirs = MOHistogram(num_bits, None, unsigned, num_bins=512)
    for b in batches:
        ours.collect(b)
        theirs.collect(b)
    for p in (99.0, 99.9, 99.99):
        assert float(ours.compute_amax("percentile", percentile=p)) == pytest.approx(
            float(theirs.compute_amax("percentile", percentile=p)), rel=1e-3)
    if isinstance(num_bits, int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert float(ours.compute_amax("entropy")) == pytest.approx(float(theirs.compute_amax("entropy")), rel=1e-3)


@needs_modelopt
@pytest.mark.parametrize("num_bits,unsigned", [(8, False), (4, False), (8, True), ((4, 3), False)])
def test_mse_matches_modelopt_numerics(num_bits, unsigned):
    # ModelOpt 0.47's histogram "mse" passes num_bits to fake_tensor_quant's `bias` slot (and
    # too few arguments to scaled_e4m3), so its result is meaningless; compare with the search
    # it intends, written with ModelOpt's own quantization functions called correctly.
    from modelopt.torch.quantization.tensor_quant import fake_tensor_quant, scaled_e4m3

    cal = HistogramCalibrator(num_bits, None, unsigned, num_bins=256)
    for b in _batches(5, outliers=10.0):
        cal.collect(b)
    counts = cal._hist.float()
    edges = torch.arange(counts.numel() + 1, dtype=torch.float32) * cal._width
    centers = (edges[1:] + edges[:-1]) / 2
    best = None
    for i in range(128, counts.numel()):
        a = centers[i]
        if isinstance(num_bits, int):
            q = fake_tensor_quant(centers, a, None, num_bits, unsigned)
        else:
            q = scaled_e4m3(centers, a, None, 4, 3)
        err = float(((q - centers) ** 2 * counts).mean())
        if best is None or err < best[0]:
            best = (err, float(a))
    assert float(cal.compute_amax("mse")) == pytest.approx(best[1], rel=1e-3)


# ---------------------------------------------------------------------- distributed
def _dist_data():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(8, 32, generator=g) * s for s in (1.0, 0.5, 3.0, 2.0)]


def _dist_worker(rank, store_path, out_dir):
    import datetime
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=150))
    try:
        mine = _dist_data()[2 * rank:2 * rank + 2]
        torch.manual_seed(0)
        model = MLP().eval()
        qpass.quantize(model, _hist_cfg(), lambda m: [m(x) for x in mine])
        calibrate_histogram(model, lambda m: [m(x) for x in mine], "percentile", percentile=99.0)
        torch.save({n: q.amax for n, q in model.named_modules() if n.endswith("input_quantizer")},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_agree_with_single_process(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_dist_worker, args=(r, str(tmp_path / "store"), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    torch.manual_seed(0)
    single = MLP().eval()
    data = _dist_data()
    qpass.quantize(single, _hist_cfg(), lambda m: [m(x) for x in data])
    calibrate_histogram(single, lambda m: [m(x) for x in data], "percentile", percentile=99.0)
    for name, amax in r0.items():
        assert torch.equal(amax, r1[name])  # every rank computes the same amax
        # re-binning onto the union range costs at most a bin or two of resolution
        assert float(amax) == pytest.approx(float(single.get_submodule(name).amax), rel=0.02)


# ---------------------------------------------------------------------- in a model
def _hist_cfg(base="INT8_DEFAULT_CFG", algorithm=None):
    cfg = copy.deepcopy(qpass.config.get_preset(base))
    cfg["quant_cfg"].append(
        {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None, "calibrator": "histogram"}})
    cfg["algorithm"] = algorithm
    return cfg


def test_calibrate_histogram_on_mlp_and_modelopt_flow():
    torch.manual_seed(0)
    data = [torch.randn(16, 32) for _ in range(4)]
    loop = lambda m: [m(x) for x in data]  # noqa: E731
    model = MLP().eval()
    qpass.quantize(model, _hist_cfg(), loop)
    inputs = [q for n, q in model.named_modules() if n.endswith("input_quantizer")]
    amax = {}
    for method in ("percentile", "entropy", "mse"):
        calibrate_histogram(model, loop, method)
        amax[method] = [float(q.amax) for q in inputs]
        assert all(a > 0 for a in amax[method])
    first_max = max(float(x.abs().max()) for x in data)
    assert amax["percentile"][0] < first_max
    # ModelOpt's per-quantizer spelling gives the same numbers (weights stay quantized there,
    # which changes what fc2 sees, so compare fc1's input only)
    for q in inputs:
        q.disable_quant(), q.enable_calib(), q.calibrator.reset()
    loop(model)
    for q in inputs:
        q.load_calib_amax("percentile", percentile=99.99)
        q.enable_quant(), q.disable_calib()
    assert float(inputs[0].amax) == pytest.approx(amax["percentile"][0], rel=1e-6)


def test_max_algorithm_with_histogram_calibrator_says_how():
    torch.manual_seed(0)
    data = [torch.randn(4, 32)]
    model = MLP().eval()
    with pytest.raises(CalibrationError, match="calibrate_histogram"):
        qpass.quantize(model, _hist_cfg(algorithm="max"), lambda m: [m(x) for x in data])


@needs_minilm
def test_minilm_int8_histogram_methods_against_max():
    """Mean cosine to FP32 on held-out text. Measured with 32 calibration / 32 held-out texts:
    max 0.982, percentile 99.999 0.987, mse 0.983, percentile 99.99 0.962, entropy 0.954. The
    default percentile and entropy clip BERT's large but meaningful FFN activations (ModelOpt's
    calibrator picks the same ranges: tools/bench_calibrators.py), so they get a looser bar."""
    from qpass import zoo

    model, loop, evals, ref = minilm_calibration_case(16)
    qpass.quantize(model, "INT8_DEFAULT_CFG", loop)
    cos_max = zoo.mean_cosine(ref, zoo.embed(model, evals))
    for name, q in model.named_modules():  # same graph, histogram calibrators on the inputs
        if name.endswith("input_quantizer") and q.is_enabled:
            q.set_from_attribute_config({"num_bits": 8, "axis": None, "calibrator": "histogram"})
    for method, options, slack in [
        ("percentile", {"percentile": 99.999}, 0.01), ("mse", {}, 0.01),
        ("percentile", {"percentile": 99.99}, 0.04), ("entropy", {}, 0.05),
    ]:
        calibrate_histogram(model, loop, method, **options)
        cos = zoo.mean_cosine(ref, zoo.embed(model, evals))
        assert cos >= cos_max - slack, (method, options, cos, cos_max)
