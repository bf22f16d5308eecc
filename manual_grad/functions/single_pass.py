"""Whole computations with their gradients in one pass: the seed's linear -> ReLU -> MSE,
and FusedMLP's linear -> ReLU -> linear -> MSE.

Autograd runs a forward pass over the inputs and then a backward pass over them again:
for the seed's 50,000 x 784 images (157 MB in float32, far more than any cache) that is
two trips through memory, and on a CPU those trips are most of the time. But every row's
gradient depends only on that row, so the gradients can be summed while the rows are
still in cache: here they are computed during the forward pass, a few thousand rows at a
time, and backward only scales them by the incoming gradient. For a small batch the gain
is the other one: a whole training step's gradients come from one Python call forward
and one backward, with no graph of intermediate nodes.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from manual_grad import _compat
from manual_grad.functions._constants import constant
from manual_grad.functions._fast_apply import fast_apply, plain_backward, tangent_sum
from manual_grad.functions.linear import affine

# The gradients a forward summed, one per input (None where none was wanted)
Sums = tuple[Tensor | None, ...]

# Rows per chunk on a CPU: ~2 MB of input per thread (a core's L2 cache here), 4 MB in all
# on two threads
CHUNK_BYTES = 2 << 20
# A batch is cut into one block of rows per thread when each block has at least this many
# rows (see _blocks_and_chunk; measured: no gain at 256 rows in all, a loss at 64)
MIN_BLOCK_ROWS = 256


def _scale(reduction: str, numel: int) -> float:
    """dC/dd^2 per element: 1/n for 'mean' (n elements), 1 for 'sum'. (An empty batch has
    an empty gradient, not a division by zero.)"""
    return 1.0 / max(numel, 1) if reduction == "mean" else 1.0


def _reduce(total: Tensor, reduction: str, numel: int) -> Tensor:
    """The loss from the sum of squares; the mean of nothing is NaN, as in torch."""
    return total / numel if reduction == "mean" else total


def _reduce_sum(total: Tensor, reduction: str, numel: int) -> Tensor:
    """``_reduce`` for a summing forward (eager only, ``total`` its own): divided in place
    by a kept tensor, not a number (see ``_constants``)."""
    if reduction != "mean":
        return total
    return total.div_(constant(float(numel), total.dtype))


def _blocks_and_chunk(x: Tensor, n: int) -> tuple[int, int]:
    """How a batch of n rows like x's is cut: (blocks, rows per block in a chunk).

    On a CPU with T threads, a batch of n = T m rows (m >= MIN_BLOCK_ROWS) is T blocks of
    m rows, each chunk is the same slice of every block, and its products are batched
    products over the blocks (bmm). Measured on a 2-core VM: ``FusedMLP.mse_loss(X, Y,
    rows=idx)`` at batch 4096 went from 0.75-0.88x torch.nn's step while the two cores
    shared a cache and 0.90-1.08x while they did not, to 0.71-0.77x either way, and the
    seed's single pass from 0.79-0.88x native's time to 0.44-0.48x. By the timings each
    thread multiplies one block, the rows it gathered (torch splits a gather's rows
    between the threads the same way), where a 2-D product splits the rows otherwise, so
    that each core read rows the other had written; and the seed's one-column products,
    run as 2-D products, used one thread. Smaller blocks gain nothing (their partial sums
    cost more). Chunks are of equal size, at most ~CHUNK_BYTES of x per thread. On a
    GPU (one chunk: no cache to fit), with small blocks, or with n not a multiple of T:
    one block."""
    if not x.is_cpu:
        return 1, max(1, n)
    threads = torch.get_num_threads()
    blocks = threads if threads > 1 and n % threads == 0 and n >= threads * MIN_BLOCK_ROWS else 1
    per_thread = CHUNK_BYTES // (x.shape[1] * x.element_size() or 1) or 1
    m = n // blocks
    chunks = max(1, -(-m // max(1, per_thread * threads // blocks)))
    return blocks, max(1, -(-m // chunks))


def cut_up(x: Tensor, n: int) -> bool:
    """Whether a batch of n rows like x's is summed in more than one block or chunk: the
    case where reading it once instead of twice can pay, or not (functional.SINGLE_PASS)."""
    blocks, step = _blocks_and_chunk(x, n)
    return blocks > 1 or step < n


def _plan(x: Tensor, n: int, *tensors: Tensor | None) -> tuple["_Blocks", int, int]:
    """(the blocks' products, rows per block, rows per block in a chunk) for a batch of n
    rows like x's, computed with ``tensors`` (checked to share a device when batched)."""
    blocks, step = _blocks_and_chunk(x, n)
    if blocks == 1:
        return _ONE_BLOCK, n, step
    _same_device(x, *tensors)  # (bmm, unlike mm, takes a meta tensor beside a CPU one)
    return _Blocks(blocks, n // blocks), n // blocks, step


def _same_device(*tensors: Tensor | None) -> None:
    """Raises torch's error for tensors on different devices (None: no tensor)."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at "
                           f"least two devices, {' and '.join(map(str, devices))}")


def _sum_of_squares(d: Tensor) -> Tensor:
    """sum of d^2, as the dot product of d with itself: one kernel, no squared copy."""
    flat = d.reshape(-1)
    return torch.dot(flat, flat)


def _sum_into(total: Tensor | None, part: Tensor) -> Tensor:
    """total + part, in place after the first chunk (the first chunk's part is the total)."""
    return part if total is None else total.add_(part)


def _mm_into(total: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """total + a @ b, in place after the first chunk (addmm_: no temporary product)."""
    return a @ b if total is None else total.addmm_(a, b)


def _bmm_into(total: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """``_mm_into`` block by block, (p, m, n): one partial sum per block of rows."""
    return torch.bmm(a, b) if total is None else total.baddbmm_(a, b)


class _Blocks:
    """The products of a chunk of rows: 2-D for one block of rows; for several, batched
    products over the blocks, (blocks, q, ...), each block's sums kept apart (the same
    matrix for every block is an expanded view)."""

    def __init__(self, blocks: int, m: int) -> None:
        self.blocks, self.m = blocks, m  # m: rows per block
        one = blocks == 1
        self.mm, self.addmm = (torch.mm, torch.addmm) if one else (torch.bmm, torch.baddbmm)
        self.mm_into = _mm_into if one else _bmm_into
        self.rows = 0 if one else (0, 1)  # the dims of a chunk's rows: (q, k) tensors
        self.rows_T = 1 if one else (0, 2)  # and (k, q) tensors

    def of(self, t: Tensor | None) -> Tensor | None:
        """A batch's tensor (n, ...) as (blocks, m, ...); as it is for one block."""
        return t if t is None or self.blocks == 1 else t.view(self.blocks, self.m, *t.shape[1:])

    def same(self, W: Tensor, transposed: bool = False) -> Tensor:
        """A matrix every block multiplies by, W or W^T: (blocks, ...) of views; as it is
        for one block. (``W.view(W.shape)`` first gives a size-1 dim the stride of a dense
        one: a (1, in) weight made by ``w.t().contiguous()`` has strides (1, 1), and its
        (in, 1) transpose made MKL's batched product ~7x slower here.)"""
        if self.blocks == 1:
            return W.t() if transposed else W
        W = W.view(W.shape).t() if transposed else W.view(W.shape)
        return W.expand(self.blocks, *W.shape)

    def chunk(self, start: int, step: int) -> slice | tuple[slice, slice]:
        """The index of a chunk: rows start..start+step of every block."""
        rows = slice(start, start + step)
        return rows if self.blocks == 1 else (slice(None), rows)

    def total(self, t: Tensor | None) -> Tensor | None:
        """A gradient summed block by block, (blocks, ...), added up over the blocks."""
        return t if t is None or self.blocks == 1 else t.sum(0)


_ONE_BLOCK = _Blocks(1, 0)  # (one block: the rows as they are, whatever their number)


def _unit_mask(u: Tensor) -> Tensor:
    """(u > 0) for u = max(0, z) >= 0, as one op: u.sign() is 1 where u > 0, else 0.

    It also gives 0 where u is NaN, where torch's ReLU lets the gradient through. Here that
    makes no difference: a NaN unit makes its row's loss NaN, so the gradient that reaches
    it is NaN too, and NaN * 0 is NaN, as is what torch passes on."""
    return u.sign()


def _keep(ctx: Any, tensors: list[Tensor | None], reduction: str,
          grads: Sums | None, with_grads: tuple[bool, ...] | None) -> None:
    """setup_context of both Functions: the inputs, and the sums forward made (if any)."""
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*tensors)
    ctx.save_for_forward(*tensors)
    # The sums are kept on ctx, not saved: nothing but backward sees them, and backward
    # takes them (each is used once), so the gradients it returns are its caller's alone
    # (AccumulateGrad can take them as .grad without a copy).
    ctx.reduction, ctx.sums, ctx.with_grads = reduction, grads, with_grads


def _take_sums(ctx: Any, need: tuple[bool, ...], g: Tensor, n_args: int,
               resum: Callable[[], Sums | None]) -> tuple[Tensor | None, ...] | None:
    """The gradients forward summed for g = 1, times g; None when backward must recompute
    them differentiably (double backward, or no sums were made: transforms, compile).
    A second backward through a retained graph finds them taken and calls ``resum``,
    which sums them again the same way, so that every backward gives the same bits (as
    it does when the gradients asked for are not the ones ``with_grads`` named)."""
    if ctx.with_grads is None or not plain_backward(g):
        return None
    sums, ctx.sums = ctx.sums, None
    # The saved inputs are not unpacked here: the sums do not read them, so, as for any
    # torch op whose backward does not read a tensor, changing them in place after forward
    # (an optimiser step, say) is no error; only a re-sum reads (and checks) them.
    if sums is None or need != ctx.with_grads:  # (forward summed exactly with_grads)
        sums = resum()
    if not (g.is_cpu and g.item() == 1.0):  # 1: loss.backward()'s own g
        # all of them times g in one call (one kernel launch on a GPU, no sync to read g)
        present = [t for t in sums if t is not None]
        if present:
            _compat.foreach_mul_(present, g)
    return (*sums, *(None,) * (n_args - len(sums)))


@fast_apply
class LinearReLUMSELossFunction(Function):
    r"""C = reduce((max(0, x W^T + b) - y)^2): the seed's network and loss in one call.

    Shapes::

        x: (n, in)   W: (out, in)   b: (out,) or None   y: (n, out)   C: a scalar

    With u = max(0, z), z = x W^T + b, d = u - y and s = 1/(n out) ('mean') or 1 ('sum'),
    for C's gradient g (a scalar), row by row:

        dC/du = 2 s d g        dC/dz = dC/du * (u > 0)        (through the ReLU)
        dC/dW = dC/dz^T x      dC/db = sum of dC/dz over rows
        dC/dx = dC/dz W        dC/dy = -dC/du

    ``forward`` (when ``with_grads`` says which of x, W, b, y will need gradients) sums
    these for g = 1 chunk by chunk, while each chunk of x is in cache, and returns them
    beside the loss as one plain tuple (None when nothing was summed): a value autograd
    passes through, not four more outputs for it to wrap and mark non-differentiable.
    ``backward`` takes them and multiplies them by g, in place (they are not the
    caller's: ``linear_relu_mse_loss`` returns the loss alone). When a graph
    of the backward itself is wanted (double backward), or they were not computed (inside
    torch.func transforms and torch.compile), ``backward`` recomputes the same lines from
    x, W, b, y with differentiable ops.

    On a CPU a large batch is summed in blocks of rows, one per thread, each line a
    batched product over the blocks (``_blocks_and_chunk``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, W: Tensor, b: Tensor | None, y: Tensor, reduction: str,
                with_grads: tuple[bool, bool, bool, bool] | None) -> tuple[Tensor, Sums | None]:
        if with_grads is None:  # the loss only; backward will recompute
            d = affine(x, W, b).clamp_min_(0.0) - y
            return _reduce(_sum_of_squares(d), reduction, d.numel()), None
        need_x, need_W, need_b, need_y = with_grads
        s2 = constant(2.0 * _scale(reduction, y.numel()), x.dtype)  # (see _constants)
        total = grad_W = grad_b = None  # sums over the chunks so far
        grad_x = torch.empty_like(x) if need_x else None
        grad_y = torch.empty_like(y) if need_y else None
        B, m, step = _plan(x, len(x), W, b, y)  # blocks of m rows, a chunk from each
        Wt, Wb = B.same(W, transposed=True), B.same(W)
        x_b, y_b, gx_b, gy_b = B.of(x), B.of(y), B.of(grad_x), B.of(grad_y)
        for start in range(0, m, step):
            chunk = B.chunk(start, step)
            xc, yc = (x_b, y_b) if step >= m else (x_b[chunk], y_b[chunk])
            u = (B.mm(xc, Wt) if b is None else B.addmm(b, xc, Wt)).clamp_min_(0.0)
            d = u - yc
            total = _sum_into(total, _sum_of_squares(d))
            grad_u = d.mul_(s2)  # dC/du for g = 1 (d is not needed any more)
            grad_z = grad_u * _unit_mask(u)
            if need_W:
                grad_W = B.mm_into(grad_W, grad_z.mT, xc)  # += dC/dz^T x, this chunk's rows
            if need_b and b is not None:
                grad_b = _sum_into(grad_b, grad_z.sum(B.rows))
            if gx_b is not None:
                B.mm(grad_z, Wb, out=gx_b[chunk])
            if gy_b is not None:
                torch.neg(grad_u, out=gy_b[chunk])
        grad_W = B.total(grad_W)
        if total is None:  # no rows: zero sums
            total = x.new_zeros(())
            grad_W = torch.zeros_like(W) if need_W else None
            grad_b = torch.zeros_like(b) if need_b and b is not None else None
        return _reduce_sum(total, reduction, y.numel()), (grad_x, grad_W, grad_b, grad_y)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        *tensors, reduction, with_grads = inputs
        _keep(ctx, tensors, reduction, output[1], with_grads)

    @staticmethod
    def backward(ctx: Any, g: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        need = ctx.needs_input_grad[:4]
        if g is None or not any(need):
            return None, None, None, None, None, None
        # each gradient was summed for g = 1 in forward: scale it (a scalar product)
        sums = _take_sums(ctx, need, g, 6, lambda: LinearReLUMSELossFunction.forward(
            *ctx.saved_tensors, ctx.reduction, need)[1])
        if sums is not None:
            return sums
        x, W, b, y = ctx.saved_tensors
        # the same lines, from the saved inputs, with ops autograd can differentiate again
        u = affine(x, W, b).clamp_min(0.0)
        grad_u = (u - y) * (2.0 * _scale(ctx.reduction, y.numel()) * g)
        grad_z = grad_u * _unit_mask(u)
        grad_x = grad_z @ W if need[0] else None
        grad_W = grad_z.t() @ x if need[1] else None
        grad_b = grad_z.sum(0) if need[2] else None
        grad_y = -grad_u if need[3] else None
        return grad_x, grad_W, grad_b, grad_y, None, None

    @staticmethod
    def jvp(ctx: Any, dx: Tensor | None, dW: Tensor | None, db: Tensor | None,
            dy: Tensor | None, *_: None) -> tuple[Tensor, None]:
        """Forward mode, the three layers' tangents in turn:
            du = (dx W^T + x dW^T + db) * (u > 0)       dC = 2 s sum(d (du - dy))"""
        x, W, b, y = ctx.saved_tensors
        u = affine(x, W, b).clamp_min(0.0)
        dz = tangent_sum(None if dx is None else affine(dx, W, None),
                         None if dW is None else affine(x, dW, None), db)
        dd = tangent_sum(None if dz is None else dz * _unit_mask(u),
                         None if dy is None else -dy)
        return (2.0 * _scale(ctx.reduction, y.numel())) * ((u - y) * dd).sum(), None


@fast_apply
class MLPMSELossFunction(Function):
    r"""C = reduce((max(0, x W1^T + b1) W2^T + b2 - y)^2): FusedMLP and its loss in one call.

    Shapes::

        x: (n, in)   W1: (hidden, in)   b1: (hidden,) or None
        W2: (out, hidden)   b2: (out,) or None   y: (n, out)   C: a scalar

    With h = max(0, x W1^T + b1), o = h W2^T + b2, d = o - y and s = 1/(n out) ('mean')
    or 1 ('sum'), for C's gradient g (a scalar), row by row:

        dC/do = 2 s d g       dC/dW2 = dC/do^T h      dC/db2 = sum of dC/do over rows
        dC/dh = dC/do W2      dC/dz = dC/dh * (h > 0)                 (through the ReLU)
        dC/dW1 = dC/dz^T x    dC/db1 = sum of dC/dz over rows
        dC/dx = dC/dz W1      dC/dy = -dC/do

    As in ``LinearReLUMSELossFunction``: ``forward`` sums these for g = 1 chunk by chunk
    (``with_grads`` says which of x, W1, b1, W2, b2, y need them), ``backward`` scales
    them by g, or recomputes them differentiably (double backward, transforms, compile).
    A whole training step's gradients then come from one Python call forward and one
    backward, with no intermediate graph nodes: the loss of ``FusedMLP.mse_loss``.

    With ``rows`` (n indices into a whole dataset x: (N, in), y: (N, out)) the batch is
    x[rows], y[rows], gathered chunk by chunk into one reused buffer while the chunk is
    summed: the batch is never written out whole and read back, which on a CPU is a
    third of a large batch's step. Gradients for x and y are not summed then.

    On a CPU a large batch is also cut into one block of rows per thread, and every line
    above runs block by block, as batched products (``_blocks_and_chunk``): dC/dW1 and
    dC/dW2 are summed per block, and the blocks' sums added at the end.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, W1: Tensor, b1: Tensor | None, W2: Tensor, b2: Tensor | None,
                y: Tensor, reduction: str, with_grads: tuple[bool, ...] | None,
                rows: Tensor | None = None) -> tuple[Tensor, Sums | None]:
        if with_grads is None:  # the loss only; backward will recompute
            if rows is not None:
                x, y = x.index_select(0, rows), y.index_select(0, rows)
            d = affine(affine(x, W1, b1).clamp_min_(0.0), W2, b2) - y
            return _reduce(_sum_of_squares(d), reduction, d.numel()), None
        need_x, need_W1, need_b1, need_W2, need_b2, need_y = with_grads
        need_b1, need_b2 = need_b1 and b1 is not None, need_b2 and b2 is not None
        if rows is not None and (need_x or need_y):
            raise ValueError("MLPMSELossFunction: with rows, no gradient is summed for the "
                             "dataset x or y; gather the batch first (x[rows]) for those")
        n = len(x) if rows is None else len(rows)
        count = n * y.shape[1]  # the elements of the batch's loss
        s2 = constant(2.0 * _scale(reduction, count), x.dtype)  # (see _constants)
        total = grad_W1 = grad_b1 = grad_W2 = grad_b2 = None  # sums over the chunks so far
        grad_x = torch.empty_like(x) if need_x else None
        grad_y = torch.empty_like(y) if need_y else None
        B, m, step = _plan(x, n, W1, b1, W2, b2, y)  # blocks of m rows, a chunk from each
        W1b, W2tb = B.same(W1), B.same(W2, transposed=True)  # (hidden, in), (hidden, out)
        # the batch: the rows to gather, or x and y; and the gradients written by rows
        rows_b, gx_b, gy_b = B.of(rows), B.of(grad_x), B.of(grad_y)
        x_b, y_b = (B.of(x), B.of(y)) if rows is None else (None, None)
        buffer = (x.new_empty(B.blocks * step, x.shape[1]) if rows is not None and step < m
                  else None)
        b1_col = None if b1 is None else b1[:, None]  # (hidden, 1): added to h^T's columns
        for start in range(0, m, step):
            chunk = B.chunk(start, step)
            if rows is not None:  # gather this chunk's rows (into the reused buffer)
                index = rows if step >= m else rows_b[chunk].reshape(-1)
                xc = (x.index_select(0, index) if buffer is None
                      else torch.index_select(x, 0, index, out=buffer[: len(index)]))
                yc = y.index_select(0, index)
                if B.blocks > 1:
                    xc, yc = xc.view(B.blocks, -1, xc.shape[1]), yc.view(B.blocks, -1, yc.shape[1])
            elif step >= m:
                xc, yc = x_b, y_b
            else:
                xc, yc = x_b[chunk], y_b[chunk]
            # h^T = max(0, W1 x^T + b1), (hidden, q) for a block of q rows: the same numbers
            # as h, in the layout whose product MKL makes fastest here, and from which
            # dC/dz^T comes out ready for dC/dW1 = dC/dz^T x
            hT = (B.mm(W1b, xc.mT) if b1_col is None else B.addmm(b1_col, W1b, xc.mT)
                  ).clamp_min_(0.0)
            h = hT.mT
            d = (B.mm(h, W2tb) if b2 is None else B.addmm(b2, h, W2tb)).sub_(yc)  # o - y
            total = _sum_into(total, _sum_of_squares(d))
            grad_o = d.mul_(s2)  # dC/do for g = 1 (d is not needed any more)
            grad_oT = grad_o.mT
            if need_W2:
                grad_W2 = B.mm_into(grad_W2, grad_oT, h)
            if need_b2:
                grad_b2 = _sum_into(grad_b2, grad_o.sum(B.rows))
            if need_x or need_W1 or need_b1:
                # dC/dz^T = (dC/do W2)^T * (h > 0)^T = W2^T dC/do^T * (h^T > 0)
                grad_zT = B.mm(W2tb, grad_oT).mul_(_unit_mask(hT))
                if need_W1:
                    grad_W1 = B.mm_into(grad_W1, grad_zT, xc)
                if need_b1:
                    grad_b1 = _sum_into(grad_b1, grad_zT.sum(B.rows_T))
                if gx_b is not None:
                    B.mm(grad_zT.mT, W1b, out=gx_b[chunk])
            if gy_b is not None:
                torch.neg(grad_o, out=gy_b[chunk])
        grad_W1, grad_W2 = B.total(grad_W1), B.total(grad_W2)
        if total is None:  # no rows: zero sums
            total = x.new_zeros(())
            grad_W1, grad_W2 = (torch.zeros_like(W) if need else None
                                for W, need in ((W1, need_W1), (W2, need_W2)))
            grad_b1, grad_b2 = (torch.zeros_like(b) if need else None
                                for b, need in ((b1, need_b1), (b2, need_b2)))
        grads = (grad_x, grad_W1, grad_b1, grad_W2, grad_b2, grad_y)
        return _reduce_sum(total, reduction, count), grads

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        *tensors, reduction, with_grads = inputs[:8]
        rows = inputs[8] if len(inputs) > 8 else None  # (compile passes no default)
        _keep(ctx, [*tensors, rows], reduction, output[1], with_grads)

    @staticmethod
    def backward(ctx: Any, g: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        need = ctx.needs_input_grad[:6]
        if g is None or not any(need):
            return (None,) * 9
        sums = _take_sums(ctx, need, g, 9, lambda: MLPMSELossFunction.forward(
            *ctx.saved_tensors[:6], ctx.reduction, need, ctx.saved_tensors[6])[1])
        if sums is not None:
            return sums
        x, W1, b1, W2, b2, y, rows = ctx.saved_tensors
        # the same lines, from the saved inputs, with ops autograd can differentiate again
        xb, yb = (x, y) if rows is None else (x.index_select(0, rows), y.index_select(0, rows))
        h = affine(xb, W1, b1).clamp_min(0.0)
        grad_o = (affine(h, W2, b2) - yb) * (2.0 * _scale(ctx.reduction, yb.numel()) * g)
        grad_z = (grad_o @ W2) * _unit_mask(h)
        grad_x = grad_z @ W1 if need[0] else None
        grad_y = -grad_o if need[5] else None
        if rows is not None:  # the batch's rows' gradients, put back at those rows
            grad_x = None if grad_x is None else x.new_zeros(x.shape).index_add(0, rows, grad_x)
            grad_y = None if grad_y is None else y.new_zeros(y.shape).index_add(0, rows, grad_y)
        return (grad_x, grad_z.t() @ xb if need[1] else None,
                grad_z.sum(0) if need[2] else None, grad_o.t() @ h if need[3] else None,
                grad_o.sum(0) if need[4] else None, grad_y, None, None, None)

    @staticmethod
    def jvp(ctx: Any, dx: Tensor | None, dW1: Tensor | None, db1: Tensor | None,
            dW2: Tensor | None, db2: Tensor | None, dy: Tensor | None,
            *_: None) -> tuple[Tensor, None]:
        """Forward mode, layer by layer (FusedMLP's), then the loss's:
            dh = (dx W1^T + x dW1^T + db1) * (h > 0)
            do = dh W2^T + h dW2^T + db2                dC = 2 s sum(d (do - dy))
        (with rows, x, y and their tangents are the batch's rows)."""
        x, W1, b1, W2, b2, y, rows = ctx.saved_tensors
        if rows is not None:
            x, y = x.index_select(0, rows), y.index_select(0, rows)
            dx = None if dx is None else dx.index_select(0, rows)
            dy = None if dy is None else dy.index_select(0, rows)
        h = affine(x, W1, b1).clamp_min(0.0)
        dz = tangent_sum(None if dx is None else affine(dx, W1, None),
                         None if dW1 is None else affine(x, dW1, None), db1)
        dh = None if dz is None else dz * _unit_mask(h)
        dd = tangent_sum(None if dh is None else affine(dh, W2, None),
                         None if dW2 is None else affine(h, dW2, None), db2,
                         None if dy is None else -dy)
        d = affine(h, W2, b2) - y
        return (2.0 * _scale(ctx.reduction, y.numel())) * (d * dd).sum(), None
