"""The Triton fake-quant kernels' guard: checked against the torch path on first use, turned off
(with a warning, torch result used) when they differ; never used for CPU tensors. The kernels
themselves run in ``pytest -m cuda`` (tests/test_cuda.py)."""

import pytest
import torch

from qpass.formats import triton_kernels as tk


@pytest.fixture(autouse=True)
def fresh_state():
    saved = dict(tk._STATE)
    tk._STATE.clear()
    yield
    tk._STATE.clear()
    tk._STATE.update(saved)


def test_first_use_is_checked_then_trusted():
    x = torch.randn(4, 8)
    calls = []
    ref = lambda: calls.append("ref") or x * 2  # noqa: E731
    fast = lambda: calls.append("fast") or x * 2  # noqa: E731
    assert torch.equal(tk._checked("int", x, fast, ref), x * 2)
    assert calls == ["fast", "ref"]
    assert torch.equal(tk._checked("int", x, fast, ref), x * 2)
    assert calls == ["fast", "ref", "fast"]  # verified: the reference no longer runs


def test_a_mismatch_turns_the_kernel_off_and_returns_the_reference():
    x = torch.randn(4, 8).bfloat16()
    with pytest.warns(UserWarning, match="Triton fp8 fake-quant kernel differs"):
        out = tk._checked("fp8", x, lambda: x + 1, lambda: x * 2)
    assert torch.equal(out, x * 2)
    assert tk._checked("fp8", x, lambda: x + 1, lambda: x * 2) is None  # off: the caller runs torch
    assert tk._STATE[("fp8", torch.bfloat16, None)] is False


def test_cpu_tensors_never_use_the_kernels(monkeypatch):
    assert not tk.usable(torch.randn(4, 4))
    monkeypatch.setenv("QPASS_TRITON", "0")
    assert not tk.usable(torch.randn(4, 4))
