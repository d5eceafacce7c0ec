"""The GPTQ weight update of one Linear, given the Hessian of its input.

For a layer ``y = x W^T`` and calibration inputs ``X``, GPTQ rounds ``W`` column by column
(input channel by input channel) to the quantizer's grid and after each column spreads the
rounding error over the columns not yet rounded, in the direction that least increases
``||X (W - Q)^T||^2`` (an optimal brain surgeon step with ``H = 2 X^T X``). The inverse
Hessian is used through its upper Cholesky factor ``U`` (``H^-1 = U^T U``), so column ``j``'s
error ``(w_j - q_j) / U_jj`` is subtracted from the later columns times ``U_j,j+1:``. Columns
are processed in blocks of ``block_size``: within a block updates are immediate, beyond it
they are applied once per block (a lazy batch update; the result is the same).

If ``H`` is diagonal, ``U`` is diagonal, nothing spreads and GPTQ is round to nearest.
"""

from __future__ import annotations

import torch

from qpass.formats.columns import ColumnGrid


def damped_inverse_factor(hessian: torch.Tensor, perc_damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1``, ``damp = perc_damp * mean(diag H)``.

    Channels that never saw a nonzero input (``H_jj == 0``) get ``H_jj = 1``: their weights
    are rounded to nearest and receive no error. If ``H`` is still not positive definite the
    damping is raised tenfold until it is (at most 6 times).
    """
    h = hessian.detach().double().clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    mean = float(diag.mean())
    damp = perc_damp * mean
    for _ in range(7):
        try:
            hd = h.clone()
            torch.diagonal(hd).add_(damp)
            chol = torch.linalg.cholesky(hd)
            inv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(inv, upper=True).float()
        except torch.linalg.LinAlgError:
            damp *= 10.0
    raise torch.linalg.LinAlgError(
        f"the Hessian is not positive definite even with damping {damp / mean:.3g} x mean(diag)"
    )


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, u: torch.Tensor, grid: ColumnGrid, block_size: int,
                  perm: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ-rounded copy of ``weight`` (``[rows, cols]``, float32), every value on ``grid``.

    ``perm``: the order in which the columns are rounded (act-order: largest Hessian diagonal
    first); ``u`` is then the factor of the permuted Hessian ``H[perm][:, perm]``. Only for
    static grids, whose scales do not depend on the order."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    if perm is not None:
        if grid.is_dynamic:
            raise ValueError("gptq: a column order needs a static grid (dynamic block scales follow the columns)")
        w = w[:, perm]
        order = perm.tolist()
    qblock = grid.block if grid.is_dynamic else None
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        wb = w[:, start:end].clone()
        errs = torch.empty_like(wb)
        ub = u[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if qblock and col % qblock == 0:
                grid.start_block(wb[:, i:i + qblock], col)
            q = grid.quantize(wb[:, i], col if perm is None else order[col])
            err = (wb[:, i] - q) / ub[i, i]
            wb[:, i] = q
            wb[:, i + 1:].sub_(err[:, None] * ub[i, i + 1:][None, :])
            errs[:, i] = err
        w[:, start:end] = wb
        if end < cols:
            w[:, end:].sub_(errs @ u[start:end, end:])
    if perm is not None:
        w = w[:, torch.argsort(perm)]
    return w
