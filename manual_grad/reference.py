r"""The seed's teaching code: linear -> ReLU -> MSE with every gradient in a ``.g``.

This is the layout of the derivation this project grew from, kept for reading,
not for speed (the drop-in layers live in :mod:`manual_grad.modules`):

    X (N, D) inputs   w (D, M) weight   b (M,) bias   Y (N,) or (N, M) targets
    Z = X w + b       U = max(0, Z)     C = 1/(N M) sum (U - Y)^2

Each ``*_grad`` function reads the gradient of the loss with respect to its
layer's output from that tensor's ``.g`` and stores the gradient with respect to
each of its inputs in their ``.g``; calling them in reverse order is backprop.
Batching never changes the math: every row of X is one input, its gradient is
one row of X.g, and a parameter used by every row collects the sum of the rows.

Three versions of ``lin_grad`` show how the loops become matrix products:
``lin_grad_loop`` (every gradient built row by row), ``lin_grad_semi`` (w.g as
one product, X.g still row by row) and ``lin_grad`` (all vectorized).
"""

import torch
from torch import Tensor


def lin(X: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Z = X w + b: (N, D) @ (D, M) + (M,) -> (N, M)."""
    return X @ w + b


def relu(x: Tensor) -> Tensor:
    """U = max(0, Z), element-wise."""
    return x.clamp_min(0.0)


def _target_like(output: Tensor, targ: Tensor) -> Tensor:
    # A (N,) target against an (N, 1) output would broadcast to (N, N): align it.
    if targ.shape == output.shape:
        return targ
    if output.dim() == 2 and output.shape[1] == 1 and targ.shape == output.shape[:1]:
        return targ.unsqueeze(1)
    raise ValueError(
        f"mse: target shape {tuple(targ.shape)} does not fit output shape "
        f"{tuple(output.shape)}; give Y the shape (N,) for M = 1 or (N, M)."
    )


def mse(output: Tensor, targ: Tensor) -> Tensor:
    """C = 1/(N M) sum_ij (U_ij - Y_ij)^2, the mean over every element."""
    return (output - _target_like(output, targ)).pow(2).mean()


def mse_grad(U: Tensor, Y: Tensor) -> None:
    """U.g = dC/dU = 2 (U - Y) / (N M): one entry per element of U, shape (N, M)."""
    U.g = 2.0 * (U - _target_like(U, Y)) / U.numel()


def relu_grad(Z: Tensor, U: Tensor) -> None:
    """Z.g = dC/dZ = U.g * dU/dZ, where dU/dZ = 1 if Z > 0 else 0 (0 at Z == 0)."""
    Z.g = U.g * (Z > 0).to(U.g.dtype)


def lin_grad_loop(X: Tensor, Z: Tensor, w: Tensor, b: Tensor) -> None:
    """Every gradient built row by row, the way the derivation reads.

    Row i of the batch computes z_i = x_i w + b (x_i: (1, D), z_i: (1, M)), so
        dC/dw  = sum_i x_i^T z_i.g      (D, 1) @ (1, M) -> (D, M), summed: w is in every row
        dC/db  = sum_i z_i.g            (M,), summed for the same reason
        dC/dx_i = z_i.g w^T             (1, M) @ (M, D) -> (1, D), one row per input
    """
    n = X.shape[0]
    w_rows = [X[i].unsqueeze(1) @ Z.g[i].unsqueeze(0) for i in range(n)]  # x_i^T z_i.g
    w.g = torch.stack(w_rows).sum(0) if n else torch.zeros_like(w)
    b.g = torch.stack([Z.g[i] for i in range(n)]).sum(0) if n else torch.zeros_like(b)
    x_rows = [Z.g[i] @ w.t() for i in range(n)]  # z_i.g w^T
    X.g = torch.stack(x_rows) if n else torch.zeros_like(X)


def lin_grad_semi(X: Tensor, Z: Tensor, w: Tensor, b: Tensor) -> None:
    """w.g as one matrix product; X.g still row by row.

    sum_i x_i^T z_i.g is, by the definition of the matrix product, X^T Z.g:
        dC/dw  = X^T Z.g                (D, N) @ (N, M) -> (D, M)
        dC/db  = sum_i z_i.g            (M,)
        dC/dx_i = z_i.g w^T             row by row, as before
    """
    n = X.shape[0]
    w.g = X.t() @ Z.g
    b.g = Z.g.sum(0)
    x_rows = [Z.g[i] @ w.t() for i in range(n)]
    X.g = torch.stack(x_rows) if n else torch.zeros_like(X)


def lin_grad(X: Tensor, Z: Tensor, w: Tensor, b: Tensor) -> None:
    """All three gradients as whole-batch products (the vectorized version).

    Stacking the rows z_i.g w^T is again a matrix product:
        dC/dw = X^T Z.g                 (D, M)
        dC/db = sum_i z_i.g             (M,)
        dC/dX = Z.g w^T                 (N, M) @ (M, D) -> (N, D)
    """
    w.g = X.t() @ Z.g
    b.g = Z.g.sum(0)
    X.g = Z.g @ w.t()


def forward_and_backward(X: Tensor, Y: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Forward lin -> relu -> mse, then backprop; returns C and sets X.g, w.g, b.g.

    Each forward line names the variable the math uses (Z, U, C); the backward
    calls the matching ``*_grad`` functions in reverse order.
    """
    Z = lin(X, w, b)
    U = relu(Z)
    C = mse(U, Y)
    mse_grad(U, Y)
    relu_grad(Z, U)
    lin_grad(X, Z, w, b)
    return C
