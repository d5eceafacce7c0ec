"""layout.abs_amax: ``x.abs().amax(dim, keepdim=True)`` exactly, by whichever reduction is faster."""

import pytest
import torch

from qpass.formats.layout import abs_amax


def _same(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


@pytest.mark.parametrize("shape, dim", [((64, 128), (1,)), ((3, 5, 70), (2,)), ((100, 8), (0,)),
                                        ((2, 3, 4, 80), (1, 3)), ((36, 16), (1,))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_abs_amax_with_zeros_nan_and_inf(shape, dim, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    flat = x.view(-1)
    flat[::7] = -0.0
    x.select(0, 0).fill_(-0.0)  # a slice of negative zeros: the result is +0, as |x| gives
    flat[11] = float("-inf")
    flat[5] = float("nan")
    got, want = abs_amax(x, dim), x.abs().amax(dim=dim, keepdim=True)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert _same(got, want)
    assert not torch.signbit(got[~got.isnan()]).any()


def test_gradient_is_that_of_abs_amax():
    x = torch.randn(4, 128, requires_grad=True)
    abs_amax(x, (1,)).sum().backward()
    got, x.grad = x.grad, None
    x.abs().amax(1, keepdim=True).sum().backward()
    assert torch.equal(got, x.grad)
