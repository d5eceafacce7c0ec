"""The straight-through estimator and the final cast shared by every format."""

from __future__ import annotations

import torch

__all__ = ["FakeQuantSTE", "cast_result"]


class FakeQuantSTE(torch.autograd.Function):
    """Forward: the fake-quantized tensor. Backward: the gradient unchanged (or masked)."""

    @staticmethod
    def forward(ctx, x, run):
        out, mask = run(x)
        ctx.has_mask = mask is not None
        if ctx.has_mask:
            ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.has_mask:
            (mask,) = ctx.saved_tensors
            grad = torch.where(mask, grad, torch.zeros_like(grad))
        return grad, None


def cast_result(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast float32 results to dtype, saturating instead of overflowing to inf (float16:
    an MX/FP8 value rounded just above the largest float16 becomes 65504, not inf)."""
    if dtype == torch.float16:
        out = out.clamp(-65504.0, 65504.0)
    return out.to(dtype)
