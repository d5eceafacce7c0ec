"""qpass.calib.max: one abs-max reduction per activation tensor, shared by its observers."""

import torch

from qpass.calib import max as cmax


def _reference(x):
    return x.abs().amax(), x.abs().reshape(-1, x.shape[-1]).amax(0).float()


def test_values_equal_a_plain_reduction_in_any_order():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 5, 7, generator=g) * 10).to(dtype)
        want_t, want_c = _reference(x)
        assert torch.equal(cmax.abs_max(x).float(), want_t.float())
        assert torch.equal(cmax.channel_abs_max(x), want_c)
        y = x.clone()  # channel maxima first: the per-tensor value comes from them
        assert torch.equal(cmax.channel_abs_max(y), want_c)
        assert torch.equal(cmax.abs_max(y).float(), want_t.float())


def test_repeated_reads_reuse_the_reduction(monkeypatch):
    x = torch.randn(4, 6)
    first_t, first_c = cmax.abs_max(x), cmax.channel_abs_max(x)
    calls = []
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: calls.append(1))
    assert cmax.abs_max(x) is first_t and cmax.channel_abs_max(x) is first_c
    assert not calls


def test_an_in_place_change_or_another_tensor_is_reduced_again():
    x = torch.randn(4, 6)
    before = cmax.abs_max(x).clone()
    x.mul_(3)  # bumps the version counter
    assert torch.equal(cmax.abs_max(x), before * 3)
    y = torch.randn(4, 6) * 100
    assert torch.equal(cmax.abs_max(y), y.abs().amax())
    del x, y
    z = torch.zeros(4, 6)  # may reuse a freed tensor's address: never its result
    assert cmax.abs_max(z).item() == 0.0 and cmax.channel_abs_max(z).abs().sum().item() == 0.0


def test_nan_and_inf_carry_through():
    x = torch.randn(4, 6)
    x[1, 2] = float("nan")
    assert torch.isnan(cmax.channel_abs_max(x)[2]) and torch.isnan(cmax.abs_max(x))
    y = torch.randn(4, 6)
    y[0, 1] = float("-inf")
    assert torch.isinf(cmax.abs_max(y)) and torch.isinf(cmax.channel_abs_max(y)[1])


def test_inference_tensors_are_reduced_without_the_memo():
    with torch.inference_mode():
        x = torch.randn(4, 6)
    assert torch.equal(cmax.abs_max(x), x.abs().amax())
    assert torch.equal(cmax.channel_abs_max(x), x.abs().amax(0))
