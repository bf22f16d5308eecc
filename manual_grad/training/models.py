"""The LightningModules train.py can run: the seed's regressor, an MLP classifier, a CNN.

All three are built from manual_grad layers (``impl: manual``) or from the identical
torch.nn layers (``impl: native``); both consume the random stream identically, so the
same seed gives the same initial weights and the two runs can be compared step by step.
``impl: fused`` runs the MLPs' linear -> ReLU -> linear as one FusedMLP Function (same
weights and state_dict keys), and the regressor's training steps take the block and its
MSE loss as one (``FusedMLP.mse_loss``); the CNN has no fused block and runs as ``manual``.
"""

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.plugins.precision import (
    DoublePrecision,
    HalfPrecision,
    MixedPrecision,
    Precision,
)
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

import manual_grad
from manual_grad.training.cuda_graph import GraphedSteps
from manual_grad.training.data import BatchGroup

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
Impl = Literal["manual", "native", "fused"]


# the per-optimiser-step hooks Lightning's manual_backward and optimizer.step dispatch
_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
# precision plugins whose backward and optimiser step add nothing but those hooks (mixed
# precision only when it has no GradScaler, checked separately)
_PLAIN_PRECISIONS = (Precision, DoublePrecision, HalfPrecision, MixedPrecision)


def sgd(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Plain SGD, the seed's optimiser; lr 0.01 suits standardised MNIST at batch 64."""
    return torch.optim.SGD(params, lr=0.01)


def mlp(lib, impl: Impl, d_in: int, hidden: int, d_out: int) -> nn.Module:
    """linear -> ReLU -> linear from ``lib`` (manual_grad or torch.nn), or fused in one."""
    if impl == "fused":
        return manual_grad.FusedMLP(d_in, hidden, d_out)
    return nn.Sequential(lib.Linear(d_in, hidden), lib.ReLU(), lib.Linear(hidden, d_out))


class DigitModel(L.LightningModule):
    """What every model here shares: the steps, the metrics and the optimiser.

    Subclasses set ``self.net`` and ``self.loss_fn`` and say whether they regress the
    digit's value (metric ``mse``, the seed's task) or classify it (metric ``loss``).
    The epoch metrics are summed in the steps and logged in the ``on_*_epoch_start`` /
    ``on_*_epoch_end`` hooks: a subclass that overrides those calls ``super()`` too.
    """

    metric = "loss"

    def __init__(self, impl: Impl, optimizer: OptimizerFactory,
                 steps_per_batch: int = 1, cuda_graph: bool = False) -> None:
        super().__init__()
        if cuda_graph and steps_per_batch == 1:
            raise ValueError("model.cuda_graph replays many optimiser steps per Lightning "
                             "step: set data.steps_per_batch > 1 (e.g. 64) as well")
        self.impl = impl
        # several optimiser steps per Lightning step: the loop below, not Lightning's
        self.automatic_optimization = steps_per_batch == 1
        self.lib = nn if impl == "native" else manual_grad
        self.optimizer_factory = optimizer
        self.cuda_graph = cuda_graph
        # per fit: whether cuda_graph is honoured, and the stepper (made at the first step)
        self._use_graph, self._graphed = cuda_graph, None
        # per stage ("train", "val", "test"): metric name -> (sum over samples, samples)
        self._epoch_sums: dict[str, dict[str, tuple[Tensor, int]]] = {}

    def predict_digit(self, out: Tensor) -> Tensor:
        raise NotImplementedError

    def target(self, y: Tensor) -> Tensor:
        return y

    def training_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The loss a training step minimises (validation and test use ``loss_fn``)."""
        return self.loss_fn(self(x), self.target(y))

    # whether ``rows_loss`` reads a batch's rows from the resident split itself
    reads_rows = False

    def rows_loss(self, x: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        """``training_loss(x[rows], y[rows])`` for x, y a whole resident split."""
        return self.training_loss(x[rows], y[rows])

    def _grouped_inputs(self, batch: Any, graphed: GraphedSteps | None) -> Iterator[tuple]:
        """A group's steps as (x, y) batches, or as (x, y, rows) with x, y the whole split
        when ``rows_loss`` reads the rows itself: then no batch is gathered. That needs the
        split as the step would see it, so not under a precision that converts the input
        (64-bit, half), nor with CUDA graphs (whose input buffers take gathered batches)."""
        precision = self.trainer.precision_plugin
        if (self.reads_rows and graphed is None and isinstance(batch, BatchGroup)
                and type(precision) is Precision):
            return ((batch.x, batch.y, rows) for rows in batch.indices)
        # the batches are cut lazily (data.BatchGroup), after Lightning's conversion of the
        # step's input: convert each as it would have (e.g. to float64 under precision 64)
        return map(precision.convert_input, batch)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self.automatic_optimization:
            x, y = batch
            loss = self.training_loss(x, y)
            self._add_to_epoch_mean("train", f"train_{self.metric}", loss.detach() * len(y),
                                    len(y))
            return loss
        # a group of batches (data.steps_per_batch): one optimiser step each, as the
        # automatic loop would take them, with Lightning's per-step work paid once
        opt = self.optimizers()
        plain = self._plain_inner_steps() and hasattr(opt, "_on_after_step")
        graphed = self._graphed_steps(opt.optimizer, plain) if self._use_graph else None
        losses, sizes = [], []
        for step in self._grouped_inputs(batch, graphed):  # (x, y) or (x, y, rows)
            n = len(step[-1])
            if graphed is not None:  # replayed (see cuda_graph.py), counted as below
                opt._on_before_step()
                losses.append(graphed.step(*step))
                opt._on_after_step()
                sizes.append(n)
                continue
            opt.zero_grad(set_to_none=True)
            loss = self.rows_loss(*step) if len(step) == 3 else self.training_loss(*step)
            if plain:  # the plain loop's body, plus Lightning's step count (global_step)
                loss.backward()
                opt._on_before_step()
                opt.optimizer.step()
                opt._on_after_step()
            else:
                self.manual_backward(loss)
                opt.step()
            losses.append(loss.detach())
            sizes.append(n)
        per_step = torch.stack(losses)
        wide = per_step.to(torch.promote_types(per_step.dtype, torch.float32))
        self._add_to_epoch_mean("train", f"train_{self.metric}",
                                (wide * wide.new_tensor(sizes)).sum(), sum(sizes))
        if self.logger is not None:  # every step's loss is still recorded, at its step
            first = self.global_step - len(losses)
            for i, value in enumerate(per_step.tolist()):
                self.logger.log_metrics({f"train_{self.metric}_step": value}, step=first + i)
        # for callbacks (the stop on a non-finite loss); Lightning does not backpropagate
        # what a manually optimised step returns
        return {"step_losses": per_step}

    def on_train_start(self) -> None:
        # a new fit has a new optimiser (capture again) and maybe another device
        self._use_graph, self._graphed = self.cuda_graph, None

    def _graphed_steps(self, optimizer: torch.optim.Optimizer,
                       plain: bool) -> GraphedSteps | None:
        """The CUDA-graph stepper, if ``cuda_graph`` can be honoured here; otherwise a
        warning (once) saying why, and the ordinary grouped steps."""
        if self._graphed is None:
            why = None
            if self.device.type != "cuda":
                why = f"the model is on {self.device}, not a CUDA device"
            elif not plain:
                why = ("a callback or the module listens to per-step hooks, or the "
                       "strategy or precision needs Lightning's own step")
            elif type(self.trainer.precision_plugin) not in (Precision, DoublePrecision):
                why = "only 32- and 64-bit precision are captured"
            elif self.trainer.lr_scheduler_configs:
                why = "an LR scheduler would change a learning rate the graph has frozen"
            if why is not None:
                rank_zero_warn(f"model.cuda_graph is ignored: {why}; the steps run as usual.")
                self._use_graph = False
                return None
            self._graphed = GraphedSteps(self.training_loss, optimizer)
        return self._graphed

    def _plain_inner_steps(self) -> bool:
        """Whether the grouped steps may call ``loss.backward()`` and the optimiser directly.

        Lightning's ``manual_backward`` and ``LightningOptimizer.step`` cost ~80 us per step
        (a 2-core CPU): they scale the loss for fp16, prepare DDP's reducer, and dispatch
        the on_before_backward / on_after_backward / on_before_optimizer_step hooks. On one
        device, without loss scaling, and with no callback or module overriding those hooks
        or ``backward``, they do nothing else, so skipping them changes no result. The
        step still goes through the LightningOptimizer's ``_on_before_step`` /
        ``_on_after_step``, the hooks Lightning's manual-optimisation loop installs to count
        ``global_step`` (private API: where they are missing, the full path is taken).
        """
        trainer = self.trainer
        precision = trainer.precision_plugin
        if (type(trainer.strategy) is not SingleDeviceStrategy
                or type(precision) not in _PLAIN_PRECISIONS
                or getattr(precision, "scaler", None) is not None
                or is_overridden("backward", self)):
            return False
        return not any(is_overridden(hook, listener)
                       for listener in (self, *trainer.callbacks) for hook in _STEP_HOOKS)

    def _add_to_epoch_mean(self, stage: str, name: str, total: Tensor, count: int) -> None:
        """Add ``total``, a metric summed over ``count`` samples, to its epoch mean, which
        ``_log_epoch_means`` logs once at the end of the stage's epoch.

        The metrics here are epoch means weighted by batch size (what ``self.log(...,
        on_epoch=True, batch_size=n)`` in each step would give, under DDP too), but
        ``self.log`` costs ~0.7 ms a call on a 2-core CPU, more than a whole batch-64
        training step; a running sum costs two small tensor ops and no host sync.
        """
        # summed in float32 at least: a bfloat16 running sum has 8 significant bits
        total = total.to(torch.promote_types(total.dtype, torch.float32))
        sums = self._epoch_sums.setdefault(stage, {})
        if name in sums:
            old_total, old_count = sums[name]
            total, count = old_total + total, old_count + count
        sums[name] = (total, count)

    def _log_epoch_means(self, stage: str) -> None:
        sums = self._epoch_sums.pop(stage, {})
        if not sums:
            return
        names = list(sums)
        dtype = sums[names[0]][0].dtype
        totals = [sums[name][0] for name in names]
        counts: list[Any] = [sums[name][1] for name in names]
        if self.trainer.world_size > 1:
            # Under DDP the processes' totals and counts are summed here, in float64, in
            # one all-reduce. Lightning's own weighting (batch_size=count, sync_dist=True)
            # averages the counts as integers, and truncates: validation shares of 8 and
            # 7 samples gave the mean over 14 (lightning 2.6).
            packed = torch.stack([*(t.double() for t in totals),
                                  *(totals[0].new_tensor(c, dtype=torch.float64)
                                    for c in counts)])
            packed = self.trainer.strategy.reduce(packed, reduce_op="sum")
            totals, counts = list(packed[: len(names)]), list(packed[len(names):])
        for name, total, count in zip(names, totals, counts, strict=True):
            # the mean over every process's samples, the same on each: sync_dist=True only
            # averages equal values (and keeps Lightning from warning that it is off)
            self.log(name, (total / count).to(dtype), prog_bar=True, batch_size=1,
                     sync_dist=True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Convert the module to the precision plugin's dtype before the weights load.

        Lightning restores a checkpoint's weights before the strategy's setup converts
        the module (``Trainer._run``), so under ``precision: 64`` a float64 checkpoint was
        copied into float32 parameters, rounded, and only then made float64 again: a
        resumed or validated run no longer had the weights it saved (val_mse 5.49021904919
        after fit, 5.49021905297 from its checkpoint). The conversion setup would make
        anyway (``model.double()``, or ``.half()`` for 16-true), made first."""
        plugin = self._trainer.precision_plugin if self._trainer is not None else None
        if type(plugin) in (DoublePrecision, HalfPrecision):
            plugin.convert_module(self)
        self._restore_epoch_sums(checkpoint)
        self._use_configured_hyperparameters(checkpoint)

    def _use_configured_hyperparameters(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run steps with the optimiser settings it is given now (lr, momentum...),
        not those saved in the checkpoint, which Lightning would otherwise restore over them:
        "lower the learning rate and resume" must lower it. The optimiser's state (momentum
        buffers) is kept. With an LR scheduler the saved rates stand: the schedule sets them.
        """
        states = checkpoint.get("optimizer_states") or []
        if len(states) != 1 or checkpoint.get("lr_schedulers"):
            return
        fresh = self.optimizer_factory(self.parameters()).param_groups
        saved = states[0].get("param_groups", [])
        if len(saved) != len(fresh):
            return
        changed = {}
        for now, then in zip(fresh, saved, strict=True):
            for key, value in now.items():
                if key != "params" and key in then and then[key] != value:
                    changed[key] = (then[key], value)
                    then[key] = value
        if changed:
            rank_zero_info("manual_grad: resuming with the optimiser settings given now: " +
                           ", ".join(f"{k}={new!r} (the checkpoint had {old!r})"
                                     for k, (old, new) in changed.items()))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a checkpoint saved mid-epoch (Ctrl-C, every_n_train_steps) carries the epoch's
        # running sums: the resumed run's epoch means are then over every sample of the
        # epoch, not only over those trained after the resume
        if "train" in self._epoch_sums:
            checkpoint["manual_grad_epoch_sums"] = {
                "epoch": self.current_epoch,
                "train": {name: [total, count]
                          for name, (total, count) in self._epoch_sums["train"].items()}}

    def _restore_epoch_sums(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("manual_grad_epoch_sums")
        self._restored_epoch = None
        if saved:
            self._epoch_sums["train"] = {name: (total.to(self.device), int(count))
                                         for name, (total, count) in saved["train"].items()}
            self._restored_epoch = saved["epoch"]

    # each stage starts from zero: an epoch cut short (an exception, Ctrl-C in a notebook)
    # must not leave its partial sums to the next one; an epoch resumed from a checkpoint
    # starts from the sums the checkpoint saved
    def on_train_epoch_start(self) -> None:
        if getattr(self, "_restored_epoch", None) != self.current_epoch:
            self._epoch_sums.pop("train", None)
        self._restored_epoch = None

    def on_validation_epoch_start(self) -> None:
        self._epoch_sums.pop("val", None)

    def on_test_epoch_start(self) -> None:
        self._epoch_sums.pop("test", None)

    def on_train_epoch_end(self) -> None:
        self._log_epoch_means("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_means("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_means("test")

    def _evaluate(self, batch: tuple[Tensor, Tensor], prefix: str) -> None:
        x, y = batch
        out = self(x)
        n = len(y)
        self._add_to_epoch_mean(prefix, f"{prefix}_{self.metric}",
                                self.loss_fn(out, self.target(y)) * n, n)
        self._add_to_epoch_mean(prefix, f"{prefix}_acc",
                                (self.predict_digit(out) == y).sum().to(out.dtype), n)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())


class MNISTRegressor(DigitModel):
    """Predict a digit's value from its pixels: linear -> ReLU -> linear, MSE (the seed).

    Args:
        in_features: pixels per image; train.py links it to the data (784 or 64).
        hidden: width of the hidden layer (the seed uses 50).
        impl: ``manual`` (hand-derived backward), ``native`` (torch.nn) or ``fused``
            (the whole MLP as one hand-derived Function, and in training the MLP and its
            loss as one: ``FusedMLP.mse_loss``).
        optimizer: a factory ``params -> Optimizer``; in YAML a ``class_path`` such as
            ``torch.optim.SGD`` with its ``init_args`` (lr, momentum...).
        steps_per_batch: optimiser steps per Lightning step; train.py links it to
            ``data.steps_per_batch``.
        cuda_graph: on a GPU, capture one whole optimiser step (forward, hand-derived
            backward, SGD) as a CUDA graph and replay it for the grouped steps (needs
            ``data.steps_per_batch`` > 1; see ``cuda_graph.py``). Where it cannot be
            used (CPU, mixed precision, an LR scheduler, per-step hooks) a warning says
            why and training runs as usual.
    """

    metric = "mse"

    def __init__(self, in_features: int = 784, hidden: int = 50, impl: Impl = "manual",
                 optimizer: OptimizerFactory = sgd, steps_per_batch: int = 1,
                 cuda_graph: bool = False) -> None:
        super().__init__(impl, optimizer, steps_per_batch, cuda_graph)
        # impl, steps_per_batch and cuda_graph are not saved: they change no parameter,
        # so a checkpoint of either implementation loads into the other (and the command
        # line, not the checkpoint, decides how it runs)
        self.save_hyperparameters(ignore=["optimizer", "impl", "steps_per_batch",
                                          "cuda_graph"])
        self.net = mlp(self.lib, impl, in_features, hidden, 1)
        self.loss_fn = self.lib.MSELoss()
        self.reads_rows = impl == "fused"

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)  # (N, 1) -> (N,), the shape of the targets

    def training_loss(self, x: Tensor, y: Tensor) -> Tensor:
        if self.impl == "fused":  # the block and its loss as one Function: the same
            # numbers, a step's gradients from one call forward and one backward
            return self.net.mse_loss(x, self.target(y))
        return super().training_loss(x, y)

    def rows_loss(self, x: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        if self.impl == "fused":  # the batch's rows read from the split as they are summed
            return self.net.mse_loss(x, self.target(y), rows=rows)
        return super().rows_loss(x, y, rows)

    def predict_digit(self, out: Tensor) -> Tensor:
        return out.round()  # a regression on the digit's value is right when it rounds to it


class MNISTClassifier(DigitModel):
    """Classify a digit: linear -> ReLU -> linear to 10 logits, cross-entropy.

    Args: as :class:`MNISTRegressor`, plus ``label_smoothing`` of the loss.
    """

    def __init__(self, in_features: int = 784, hidden: int = 100, impl: Impl = "manual",
                 label_smoothing: float = 0.0, optimizer: OptimizerFactory = sgd,
                 steps_per_batch: int = 1) -> None:
        super().__init__(impl, optimizer, steps_per_batch)
        self.save_hyperparameters(ignore=["optimizer", "impl", "steps_per_batch"])
        self.net = mlp(self.lib, impl, in_features, hidden, 10)
        self.loss_fn = self.lib.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def target(self, y: Tensor) -> Tensor:
        return y.long()

    def predict_digit(self, out: Tensor) -> Tensor:
        return out.argmax(1).to(out.dtype)


class MNISTConvNet(MNISTClassifier):
    """A small CNN: two blocks of Conv2d(3x3) -> BatchNorm2d -> ReLU -> MaxPool2d(2),
    then Flatten -> Linear to 10 logits, cross-entropy. Square images of in_features
    pixels (28 x 28, or 8 x 8 offline).

    Args: as :class:`MNISTClassifier`, with ``channels`` the two blocks' widths.
    """

    def __init__(self, in_features: int = 784, channels: tuple[int, int] = (8, 16),
                 impl: Impl = "manual", label_smoothing: float = 0.0,
                 optimizer: OptimizerFactory = sgd, steps_per_batch: int = 1) -> None:
        DigitModel.__init__(self, impl, optimizer, steps_per_batch)
        self.save_hyperparameters(ignore=["optimizer", "impl", "steps_per_batch"])
        side = math.isqrt(in_features)
        if side * side != in_features:
            raise ValueError(f"MNISTConvNet needs square images, got in_features={in_features}")
        self.side = side
        lib, (c1, c2) = self.lib, channels
        self.net = nn.Sequential(
            lib.Conv2d(1, c1, 3, padding=1), lib.BatchNorm2d(c1), lib.ReLU(), lib.MaxPool2d(2),
            lib.Conv2d(c1, c2, 3, padding=1), lib.BatchNorm2d(c2), lib.ReLU(), lib.MaxPool2d(2),
            lib.Flatten(), lib.Linear(c2 * (side // 4) ** 2, 10))
        self.loss_fn = lib.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.view(-1, 1, self.side, self.side))
