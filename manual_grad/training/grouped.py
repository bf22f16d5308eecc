"""Several optimiser steps per Lightning step (``data.steps_per_batch``), and their CUDA-graph
replay (``model.cuda_graph``): the fast paths, apart from the textbook models.

Lightning's per-step work (hooks, logging, progress, the loop itself) costs about as much
as a batch-64 step of the seed's network. With ``steps_per_batch`` K > 1 the data module
hands each Lightning step a :class:`~manual_grad.training.data.BatchGroup` of K batches and
the model takes one optimiser step per batch, as Lightning's automatic loop would, paying
the per-step work once per K. The results are the same steps (tests/test_training.py).

The seam is one mixin, :class:`GroupedSteps`, listed before the textbook model:
``class MNISTRegressor(GroupedSteps, DigitModel)``. With K = 1 it hands every step to the
textbook ``training_step`` untouched.
"""

from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.plugins.precision import (
    DoublePrecision,
    HalfPrecision,
    MixedPrecision,
    Precision,
)
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from manual_grad import _compat
from manual_grad.training.cuda_graph import GraphedSteps
from manual_grad.training.data import BatchGroup

# the per-optimiser-step hooks Lightning's manual_backward and optimizer.step dispatch
_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
# precision plugins whose backward and optimiser step add nothing but those hooks (mixed
# precision only when it has no GradScaler, checked separately)
_PLAIN_PRECISIONS = (Precision, DoublePrecision, HalfPrecision, MixedPrecision)


class GroupedSteps:
    """A LightningModule mixin: K optimiser steps per Lightning step when the data groups
    its batches. The model provides ``training_loss(x, y)`` (and may provide
    ``rows_loss(x, y, rows)``, reading a batch's rows from the whole split itself, with
    ``reads_rows = True``) and ``self.metric``; call :meth:`group_steps` in ``__init__``.
    """

    # whether ``rows_loss`` reads a batch's rows from the resident split itself
    reads_rows = False

    def group_steps(self, steps_per_batch: int = 1, cuda_graph: bool = False) -> None:
        if cuda_graph and steps_per_batch == 1:
            raise ValueError("model.cuda_graph replays many optimiser steps per Lightning "
                             "step: set data.steps_per_batch > 1 (e.g. 64) as well")
        # several optimiser steps per Lightning step: the loop below, not Lightning's
        self.automatic_optimization = steps_per_batch == 1
        self.cuda_graph = cuda_graph
        # per fit: whether cuda_graph is honoured, and the stepper (made at the first step)
        self._use_graph, self._graphed = cuda_graph, None

    def rows_loss(self, x: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        """``training_loss(x[rows], y[rows])`` for x, y a whole resident split."""
        return self.training_loss(x[rows], y[rows])

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        # a group of batches (data.steps_per_batch): one optimiser step each, as the
        # automatic loop would take them, with Lightning's per-step work paid once
        opt = self.optimizers()
        hooks = _compat.step_count_hooks(opt)
        plain = hooks is not None and self._plain_inner_steps()
        graphed = self._graphed_steps(opt.optimizer, plain) if self._use_graph else None
        losses, sizes = [], []
        for step in self._grouped_inputs(batch, graphed):  # (x, y) or (x, y, rows)
            n = len(step[-1])
            if graphed is not None:  # replayed (see cuda_graph.py), counted as below
                hooks[0]()
                losses.append(graphed.step(*step))
                hooks[1]()
                sizes.append(n)
                continue
            opt.zero_grad(set_to_none=True)
            loss = self.rows_loss(*step) if len(step) == 3 else self.training_loss(*step)
            if plain:  # the plain loop's body, plus Lightning's step count (global_step)
                loss.backward()
                hooks[0]()
                opt.optimizer.step()
                hooks[1]()
            else:
                self.manual_backward(loss)
                opt.step()
            losses.append(loss.detach())
            sizes.append(n)
        per_step = torch.stack(losses)
        wide = per_step.to(torch.promote_types(per_step.dtype, torch.float32))
        self.add_to_epoch_mean("train", f"train_{self.metric}",
                               (wide * wide.new_tensor(sizes)).sum(), sum(sizes))
        if self.logger is not None:  # every step's loss is still recorded, at its step
            first = self.global_step - len(losses)
            for i, value in enumerate(per_step.tolist()):
                self.logger.log_metrics({f"train_{self.metric}_step": value}, step=first + i)
        # for callbacks (the stop on a non-finite loss); Lightning does not backpropagate
        # what a manually optimised step returns
        return {"step_losses": per_step}

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

    def on_train_start(self) -> None:
        super().on_train_start()
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
        step still goes through the LightningOptimizer's step-count hooks, which count
        ``global_step`` (private API, in ``manual_grad._compat``: where they are missing,
        the full path is taken).
        """
        trainer = self.trainer
        precision = trainer.precision_plugin
        if (type(trainer.strategy) is not SingleDeviceStrategy
                or type(precision) not in _PLAIN_PRECISIONS
                or getattr(precision, "scaler", None) is not None
                or _compat.is_overridden("backward", self)):
            return False
        return not any(_compat.is_overridden(hook, listener)
                       for listener in (self, *trainer.callbacks) for hook in _STEP_HOOKS)
