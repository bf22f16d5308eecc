"""Drop-in nn.Modules whose forward runs a hand-derived Function.

Each class subclasses its torch.nn counterpart, so it has the very same
constructor signature, parameters, default initialisation (``reset_parameters``),
``extra_repr`` and state_dict keys: a state_dict saved from one loads into the
other, both ways, and ``isinstance(layer, torch.nn.Linear)`` still holds. Only
``forward`` differs: it goes through :mod:`manual_grad.functional`, which checks
the arguments and calls the Function whose backward was derived by hand.
"""

import torch
from torch import Tensor, nn

from manual_grad import _compat
from manual_grad import functional as F


def weight_and_bias(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``layer.weight, layer.bias``, read straight from ``layer._parameters`` when they
    are registered there: nn.Module's ``__getattr__`` costs ~3 us a read on a 2-core CPU,
    ~1% of a small training step per layer. Pruning, weight_norm and parametrizations
    move a weight out of ``_parameters``; then it is read the usual way."""
    params = _compat.module_parameters(layer)
    if params is None:  # (the internal is gone: the usual way)
        return layer.weight, layer.bias
    weight = params.get("weight")
    bias = params["bias"] if "bias" in params else layer.bias
    return (layer.weight if weight is None else weight), bias


class Linear(nn.Linear):
    """``torch.nn.Linear`` with the hand-derived backward of :class:`LinearFunction`.

    Linear(in_features, out_features, bias=True, device=None, dtype=None);
    input (*, in_features) -> output (*, out_features).
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, *weight_and_bias(self))


class ReLU(nn.ReLU):
    """``torch.nn.ReLU`` with the hand-derived backward of :class:`ReLUFunction`.

    ReLU(inplace=False). ``inplace=True`` overwrites the input with the result,
    exactly as torch does; this is safe for the hand-written backward because it
    reads only the output's sign. As in torch, autograd refuses it when the
    overwritten input is needed by an earlier layer's backward.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.relu(input, inplace=self.inplace)


class MSELoss(nn.MSELoss):
    """``torch.nn.MSELoss`` with the hand-derived backward of :class:`MSELossFunction`.

    MSELoss(size_average=None, reduce=None, reduction='mean'). Shapes that would
    broadcast the loss beyond the input's shape raise an error (torch only warns).
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(input, target, reduction=self.reduction)


class LeakyReLU(nn.LeakyReLU):
    """``torch.nn.LeakyReLU`` with the hand-derived backward of ``LeakyReLUFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.leaky_relu(input, self.negative_slope, self.inplace)


class Sigmoid(nn.Sigmoid):
    """``torch.nn.Sigmoid`` with the hand-derived backward of ``SigmoidFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.sigmoid(input)


class Tanh(nn.Tanh):
    """``torch.nn.Tanh`` with the hand-derived backward of ``TanhFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.tanh(input)


class GELU(nn.GELU):
    """``torch.nn.GELU`` (approximate 'none' or 'tanh'), backward by ``GELUFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.gelu(input, self.approximate)


class SiLU(nn.SiLU):
    """``torch.nn.SiLU`` with the hand-derived backward of ``SiLUFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.silu(input, self.inplace)


class Softmax(nn.Softmax):
    """``torch.nn.Softmax`` with the hand-derived backward of ``SoftmaxFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, self.dim)


class LogSoftmax(nn.LogSoftmax):
    """``torch.nn.LogSoftmax`` with the hand-derived backward of ``LogSoftmaxFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, self.dim)


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss``: one fused log-softmax + NLL backward
    (``CrossEntropyLossFunction``); class-index or probability targets, weight,
    ignore_index, label_smoothing and every reduction."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                               self.label_smoothing)


class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss`` with the backward of ``BCEWithLogitsLossFunction``."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(input, target, self.weight, self.reduction,
                                                  self.pos_weight)


class L1Loss(nn.L1Loss):
    """``torch.nn.L1Loss`` with the hand-derived backward of ``L1LossFunction``."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.l1_loss(input, target, self.reduction)


class HuberLoss(nn.HuberLoss):
    """``torch.nn.HuberLoss`` with the hand-derived backward of ``HuberLossFunction``."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.huber_loss(input, target, self.reduction, self.delta)


class Dropout(nn.Dropout):
    """``torch.nn.Dropout``; the backward keeps only a boolean mask (``DropoutFunction``).
    Its random stream differs from torch's: the same seed drops different units."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` with the hand-derived backward of ``LayerNormFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class _BatchNormForward:
    """torch.nn's _BatchNorm.forward, calling manual_grad's batch_norm."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        # refused before num_batches_tracked moves: a refused batch changes no state
        F._batch_norm_checks(input, use_batch, self.eps)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            # momentum=None: a cumulative moving average of every batch so far
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else factor
        keep_running = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if keep_running else None,
                            self.running_var if keep_running else None, self.weight,
                            self.bias, use_batch, factor, self.eps)


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` with the hand-derived backward of ``BatchNormFunction``."""


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` with the hand-derived backward of ``BatchNormFunction``."""


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` (stride, padding, dilation, groups, bias) with the backward of
    ``Conv2dFunction``. A padding_mode other than 'zeros' pads with torch's own F.pad
    first, exactly as torch.nn.Conv2d does."""

    def forward(self, input: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            padded = nn.functional.pad(input, self._reversed_padding_repeated_twice,
                                       mode=self.padding_mode)
            return F.conv2d(padded, self.weight, self.bias, self.stride, 0, self.dilation,
                            self.groups)
        return F.conv2d(input, self.weight, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class MaxPool2d(nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` with the hand-derived backward of ``MaxPool2dFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            self.ceil_mode, self.return_indices)


class AvgPool2d(nn.AvgPool2d):
    """``torch.nn.AvgPool2d`` with the backward of ``AvgPool2dFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)


class Flatten(nn.Flatten):
    """``torch.nn.Flatten`` with the hand-derived backward of ``FlattenFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.flatten(input, self.start_dim, self.end_dim)


class Embedding(nn.Embedding):
    """``torch.nn.Embedding`` (dense gradients) with the backward of ``EmbeddingFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


class FusedLinearReLU(nn.Sequential):
    """Linear then ReLU as one fused Function (``LinearReLUFunction``): one Python call
    forward and backward instead of two. Its children are ``torch.nn.Linear`` and
    ``torch.nn.ReLU``, so initialisation and state_dict keys ("0.weight", "0.bias") are
    those of ``nn.Sequential(nn.Linear(...), nn.ReLU())``, which ``convert(fuse=True)``
    turns into this layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(nn.Linear(in_features, out_features, bias, device, dtype), nn.ReLU())

    def forward(self, input: Tensor) -> Tensor:
        # (self[0] costs a few us per call in nn.Sequential)
        return F.linear_relu(input, *weight_and_bias(self._modules["0"]))


class FusedMLP(nn.Sequential):
    """Linear -> ReLU -> Linear (the seed's network) as one fused Function
    (``MLPFunction``): one Python call forward and one backward for the whole block.
    Children, initialisation and state_dict keys are those of
    ``nn.Sequential(nn.Linear(in, hidden), nn.ReLU(), nn.Linear(hidden, out))``, which
    ``convert(fuse=True)`` turns into this layer.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int,
                 bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(nn.Linear(in_features, hidden_features, bias, device, dtype),
                         nn.ReLU(),
                         nn.Linear(hidden_features, out_features, bias, device, dtype))

    def forward(self, input: Tensor) -> Tensor:
        modules = self._modules  # (self[i] costs a few us per call in nn.Sequential)
        return F.mlp(input, *weight_and_bias(modules["0"]), *weight_and_bias(modules["2"]))

    def mse_loss(self, input: Tensor, target: Tensor, reduction: str = "mean",
                 rows: Tensor | None = None) -> Tensor:
        """``mse_loss(self(input), target, reduction=reduction)`` as one Function that also
        sums every gradient in its forward pass (``MLPMSELossFunction``): the cheapest
        training step for a regression with this block. input: (n, in_features); target:
        (n, out_features), or (n,) for one output; reduction 'mean' or 'sum'.

        rows: the batch's indices into a dataset passed whole as input and target: the
        loss of ``self(input[rows])`` against ``target[rows]``, gathered as it is summed
        (see ``functional.mlp_mse_loss``)."""
        modules = self._modules
        return F.mlp_mse_loss(input, *weight_and_bias(modules["0"]),
                              *weight_and_bias(modules["2"]), target, reduction, rows)


class Hardswish(nn.Hardswish):
    """``torch.nn.Hardswish`` with the hand-derived backward of ``HardswishFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.hardswish(input, self.inplace)


class Hardsigmoid(nn.Hardsigmoid):
    """``torch.nn.Hardsigmoid`` with the hand-derived backward of ``HardsigmoidFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.hardsigmoid(input, self.inplace)


class Hardtanh(nn.Hardtanh):
    """``torch.nn.Hardtanh`` with the hand-derived backward of ``HardtanhFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.hardtanh(input, self.min_val, self.max_val, self.inplace)


class ReLU6(nn.ReLU6):
    """``torch.nn.ReLU6`` (Hardtanh from 0 to 6), backward by ``HardtanhFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.hardtanh(input, self.min_val, self.max_val, self.inplace)


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``torch.nn.AdaptiveAvgPool2d`` with the backward of ``AdaptiveAvgPool2dFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(input, self.output_size)


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` with the hand-derived backward of ``GroupNormFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` with the hand-derived backward of ``RMSNormFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)


class Conv1d(nn.Conv1d):
    """``torch.nn.Conv1d``: Conv2dFunction's backward on images of height 1. A padding_mode
    other than 'zeros' pads with torch's own F.pad first, as torch.nn.Conv1d does."""

    def forward(self, input: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            padded = nn.functional.pad(input, self._reversed_padding_repeated_twice,
                                       mode=self.padding_mode)
            return F.conv1d(padded, self.weight, self.bias, self.stride, 0, self.dilation,
                            self.groups)
        return F.conv1d(input, self.weight, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A MultiheadAttention mask as an additive float one: a bool mask's True (may not
    attend) becomes -inf, as torch's; a float mask is already additive."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        mask, float("-inf"))


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with hand-derived backward passes: the input and
    output projections are ``LinearFunction``s (so ``in_proj_weight`` and ``out_proj``
    get Linear's gradients), the attention is ``ScaledDotProductAttentionFunction``, or,
    when the weights are returned (``need_weights=True``, torch's default), the
    product, softmax, dropout and product each with its own Function.

    Every option of torch's: batch_first, attn_mask (bool or float, (L, S) or
    (N heads, L, S)), key_padding_mask, need_weights and average_attn_weights,
    is_causal, dropout, bias, add_bias_kv, add_zero_attn, kdim and vdim. The rest is
    moving data between the shapes, in torch's ops: views, transposes and the
    concatenations that append bias_k or zeros to the keys.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # one sequence: a batch of one, sequence first
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        first = self.batch_first and batched  # (N, L, E) in and out, else (L, N, E)
        N, L = query.shape[:2] if first else query.shape[1::-1]
        E, H, hd = query.shape[2], self.num_heads, self.head_dim
        if is_causal and attn_mask is None:
            raise RuntimeError("MultiheadAttention: is_causal=True needs attn_mask as well "
                               "(torch's rule: it is a hint); give the causal mask")
        causal = is_causal and key_padding_mask is None and not need_weights
        attn_mask = None if causal else _float_mask(attn_mask, query.dtype)
        key_padding_mask = _float_mask(key_padding_mask, query.dtype)
        q, k, v = self._in_projection(query, key, value)  # in the inputs' layout

        def heads(t: Tensor) -> Tensor:  # (N, S, E) or (S, N, E) -> (N, H, S, hd), a view
            t = t.unflatten(-1, (H, hd))
            return t.transpose(1, 2) if first else t.permute(1, 2, 0, 3)

        q, k, v = heads(q), heads(k), heads(v)
        if self.bias_k is not None:  # one more key and value, the same for every sample
            k = torch.cat([k, self.bias_k.view(1, H, 1, hd).expand(N, -1, -1, -1)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, H, 1, hd).expand(N, -1, -1, -1)], dim=2)
            attn_mask = None if attn_mask is None else nn.functional.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else nn.functional.pad(
                key_padding_mask, (0, 1))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, hd)], dim=2)
            attn_mask = None if attn_mask is None else nn.functional.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else nn.functional.pad(
                key_padding_mask, (0, 1))
        S = k.shape[2]
        if attn_mask is not None:  # (L, S) or (N H, L, S): broadcast to (N, H, L, S)
            attn_mask = attn_mask.view(1, 1, L, S) if attn_mask.dim() == 2 else \
                attn_mask.view(N, H, L, S)
        if key_padding_mask is not None:  # (N, S): added to the mask
            kpm = key_padding_mask.view(N, 1, 1, S)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = F.matmul(q * (1.0 / float(hd)) ** 0.5, k.transpose(-2, -1))
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = F.dropout(F.softmax(scores, -1), p)
            out = F.matmul(weights, v)  # (N, H, L, hd)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, p, causal)
            weights = None
        # (N, H, L, hd) -> the heads side by side, in the inputs' layout
        out = (out.transpose(1, 2) if first else out.permute(2, 0, 1, 3)).reshape(N * L, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        out = out.view(N, L, -1) if first else out.view(L, N, -1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(1)
            if not batched:
                weights = weights.squeeze(0)
        if not batched:
            out = out.squeeze(1)
        return out, weights

    def _in_projection(self, query: Tensor, key: Tensor,
                       value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v = the three input projections (LinearFunction). For self-attention one
        product with the packed in_proj_weight serves all three."""
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if not self._qkv_same_embed_dim:
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        if query is key and key is value:
            qkv = F.linear(query, self.in_proj_weight, b)
            return qkv[..., :E], qkv[..., E:2 * E], qkv[..., 2 * E:]
        wq, wk, wv = self.in_proj_weight.chunk(3)
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
