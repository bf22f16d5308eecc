"""The LightningCLI behind train.py.

On top of Lightning's CLI it
- checks the values a run cannot use (a hidden width of 0, a negative learning rate) when
  the arguments are parsed, and puts the bad key and the fix on an error's first line;
- keeps each run's artefacts in one folder, ``<root>/<name>``: the logger's versions, the
  checkpoints (``checkpoints/``), the loss plot and the config. The root is
  ``--trainer.default_root_dir`` when given, else the logger's ``save_dir`` (``runs``);
  the name is the logger's, followed by ``-<data>`` when the data used is not the one
  the name starts with (``mnist_regression-digits`` for the offline fallback);
- resolves ``--ckpt_path last`` and ``--ckpt_path best`` from that folder's checkpoints
  for fit, validate and test, and refuses in one line a checkpoint of another shape or
  dataset, or a finished run that would train no further.
"""

import difflib
import inspect
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch.distributed as dist
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from manual_grad.training.callbacks import RunError, StopOnNonFinite
from manual_grad.training.checkpoint_io import CheckpointError, check_checkpoint
from manual_grad.training.data import MNISTDataModule
from manual_grad.training.models import DigitModel


class RunFinished(Exception):
    """The checkpoint to resume holds a run that already trained as far as asked."""


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _positive_number(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            and v > 0)


# options checked once parsed: key in a subcommand's config -> (test, what is allowed)
CHECKS = {
    "model.init_args.hidden": (_positive_int, "an integer >= 1"),
    "model.init_args.channels": (lambda v: all(_positive_int(c) for c in v),
                                 "two integers >= 1"),
    "model.init_args.optimizer.init_args.lr": (_positive_number, "a finite number > 0"),
    "data.batch_size": (_positive_int, "an integer >= 1"),
    "data.val_size": (_positive_int, "an integer >= 1"),
    "data.steps_per_batch": (_positive_int, "an integer >= 1"),
}


def _option(key: str) -> str:
    """``model.init_args.hidden`` -> ``--model.hidden``, as a user types it."""
    return "--" + key.replace(".init_args.", ".")


def _condense(message: str) -> str:
    """One line from jsonargparse's error: the bad key and the most specific reason."""
    lines = [re.sub(r"^\s*-\s+", "", line).strip() for line in message.strip().splitlines()]
    lines = [line for line in lines if line]
    keys = re.findall(r'Parser key "([^"]+)"', message)
    klass = re.search(r"class_path '([\w.]+)'", message)
    skip = ("Does not validate", "Subtypes:", "Errors:", "Given value",
            "Problem with given class_path", "Expected a <class 'NoneType'>")
    specific = [re.sub(r'.*Parser key "[^"]+":\s*', "", line) for line in lines
                if not line.startswith(skip)]
    specific = [line for line in specific if line and not line.endswith(":")]
    # the most telling reasons first: a wrong type, an unknown option
    ranked = sorted(specific, key=lambda line: 0 if re.match(r"Expected a <class|Option '|"
                                                               r"Key '|Value '", line) else 1)
    reason = ranked[0] if ranked else lines[0] if lines else message
    unknown = re.search(r"Option '(\w+)' is not accepted", reason)
    if unknown and klass:  # suggest the option that was probably meant
        name, target = unknown.group(1), klass.group(1)
        try:
            module, _, attr = target.rpartition(".")
            params = inspect.signature(getattr(__import__(module, fromlist=[attr]), attr))
            close = difflib.get_close_matches(name, list(params.parameters), n=1)
        except Exception:  # a suggestion is a nicety; the error stands without it
            close = []
        if close:
            reason += f"; did you mean '{close[0]}'?"
    given = re.search(r"Given value: (.+?)(?:\. Got value.*)?$", message, re.MULTILINE)
    if given and "NestedArg" not in given.group(1) and "Got value" not in reason:
        reason += f" (got {given.group(1)})"
    where = ".".join(dict.fromkeys(keys))
    return f"{where}: {reason}" if where and not reason.startswith(where) else reason


class Parser(LightningArgumentParser):
    """Lightning's parser, whose errors start with one line naming the bad key or value
    and how to see the options; jsonargparse's full explanation follows, the usage text
    does not (the first line is what a user reads)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse is trying alternatives: not an error yet
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        fail(parser.prog.replace(" [options]", ""), message)


def fail(prog: str, message: str) -> NoReturn:
    """End with the one-line error (then jsonargparse's details, if any), exit status 2."""
    sys.stderr.write(f"{prog}: error: {_condense(message)}\n"
                     f"  (all options: {prog} --help)\n")
    if "\n" in message.strip():
        sys.stderr.write("  details:\n" + "".join(
            f"    {line}\n" for line in message.strip().splitlines()))
    raise SystemExit(2)


class CLI(LightningCLI):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", Parser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the model's input width follows the data actually loaded (784, or 64 offline)
        parser.link_arguments("data.in_features", "model.init_args.in_features",
                              apply_on="instantiate")
        # the data groups the batches, the model steps through each group
        parser.link_arguments("data.steps_per_batch", "model.init_args.steps_per_batch")
        # --nan.stop false trains on through a NaN loss (default: stop, exit 1)
        parser.add_lightning_class_args(StopOnNonFinite, "nan")

    def parse_arguments(self, parser: LightningArgumentParser, args: object) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if not sub:
            return
        config = self.config[sub]
        for key, (ok, allowed) in CHECKS.items():
            value = config.get(key) if key in config else None
            if value is not None and not ok(value):
                fail(f"{parser.prog} {sub}", f"{_option(key)} must be {allowed}, got {value!r}")
        # LightningCLI reads a checkpoint file's hyperparameters right after parsing; a
        # broken or tampered file must end here with a message, not a traceback there.
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            try:
                check_checkpoint(ckpt_path)
            except CheckpointError as err:
                fail(f"{parser.prog} {sub}", str(err))

    # -- where a run's artefacts go ---------------------------------------------------

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer_init = self.config_init[self.subcommand]["trainer"]
        trainer_args = self.config[self.subcommand]["trainer"]
        self.run_dir = self._route(trainer_init, trainer_args)
        return super().instantiate_trainer(**kwargs)

    def _route(self, trainer_init: Namespace, trainer_args: Namespace) -> Path | None:
        """Point the logger and the checkpoints at ``<root>/<name>``; return that folder."""
        logger, logger_args = trainer_init.get("logger"), trainer_args.get("logger")
        init_args = (dict(logger_args.get("init_args") or {})
                     if isinstance(logger_args, Namespace) else {})
        if "save_dir" not in init_args or "name" not in init_args:
            return None  # a logger train.py does not know: Lightning's own rules apply
        root = trainer_init.get("default_root_dir") or init_args["save_dir"] or "runs"
        name = init_args["name"] or "run"
        source = getattr(self.datamodule, "source", None)
        if source and not name.startswith(source):
            name = f"{name}-{source}"
        init_args.update(save_dir=str(root), name=name)
        trainer_init["logger"] = type(logger)(**init_args)
        run_dir = Path(root) / name
        for callback in trainer_init.get("callbacks") or []:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.realpath(run_dir / "checkpoints")
        return run_dir

    # -- which checkpoint a subcommand starts from --------------------------------------

    def before_fit(self) -> None:
        self._resolve_checkpoint()

    def before_validate(self) -> None:
        self._resolve_checkpoint()

    def before_test(self) -> None:
        self._resolve_checkpoint()

    def _checkpoint_dir(self) -> Path | None:
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                return Path(callback.dirpath)
        return None

    def _resolve_checkpoint(self) -> None:
        config = self.config_init[self.subcommand]
        asked = config.get("ckpt_path")
        if asked not in ("last", "best") and (asked is None or not isinstance(asked, str)
                                             or asked in ("hpc", "registry")):
            return
        folder = self._checkpoint_dir()
        if asked in ("last", "best") and folder is None:
            raise RunError(f"--ckpt_path {asked}: this run has no checkpoint folder (no "
                           "logger and no ModelCheckpoint dirpath); pass a checkpoint file")
        if asked in ("last", "best"):
            lasts = sorted(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime) \
                if folder.is_dir() else []
            if not lasts:
                if self.subcommand == "fit" and asked == "last":
                    print(f"manual_grad: no checkpoint in {folder} yet: training from the "
                          "start", flush=True)
                    config["ckpt_path"] = None
                    return
                raise RunError(f"--ckpt_path {asked}: no checkpoint in {folder}; run fit "
                               "first (with the same config and data), or pass a "
                               "checkpoint file")
            path = lasts[-1]
            if asked == "best":
                path = self._best(check_checkpoint(path), folder, path)
        else:
            path = Path(asked)
            if not path.is_file():
                raise RunError(f"--ckpt_path {asked}: no such file")
        state = check_checkpoint(path)
        self._check_compatible(state, path)
        if self.subcommand == "fit":
            done = self._finished(state)
            if done:
                raise RunFinished(f"the run in {path} already trained {done}; nothing to "
                                  "train. To train further, raise that limit")
        config["ckpt_path"] = str(path)

    @staticmethod
    def _best(state: dict[str, Any], folder: Path, last: Path) -> Path:
        """The best checkpoint the newest ``last*.ckpt`` knows of (ModelCheckpoint's
        state), looked for where it was written and, if the folder moved, in this one."""
        for value in state.get("callbacks", {}).values():
            best = value.get("best_model_path") if isinstance(value, dict) else None
            if best:
                for candidate in (Path(best), folder / Path(best).name):
                    if candidate.is_file():
                        return candidate
        raise RunError(f"--ckpt_path best: {last} names no best checkpoint that still exists "
                       f"in {folder} (was validation off?); pass a checkpoint file instead")

    def _check_compatible(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint of another shape or dataset, in one line."""
        data = self.datamodule
        saved_source = state.get(type(data).__qualname__, {}).get("source")
        trained_on = (f"trained on {saved_source} data" if saved_source
                      else "trained on other data")
        saved = state.get("state_dict", {})
        mine = self.model.state_dict()
        for key, value in mine.items():
            if key in saved and tuple(saved[key].shape) != tuple(value.shape):
                raise RunError(
                    f"checkpoint {path} holds {key} of shape {tuple(saved[key].shape)} "
                    f"({trained_on}); this model's is {tuple(value.shape)} ({data.in_features}"
                    f" inputs from {data.source}); resume it with the data and options it was "
                    "trained with, or start without --ckpt_path")
        missing = sorted(set(mine) - set(saved))
        extra = sorted(set(saved) - set(mine))
        if missing or extra:
            raise RunError(f"checkpoint {path} is of another model: it lacks "
                           f"{missing[:3] or 'nothing'} and has {extra[:3] or 'nothing'} "
                           "more; pass the same --model options it was trained with")
        if saved_source is not None and saved_source != data.source:
            raise RunError(f"checkpoint {path} was {trained_on} and this run's data is "
                           f"{data.source}; use that data, or start without --ckpt_path")

    def _finished(self, state: dict[str, Any]) -> str | None:
        """What limit the checkpoint's run already reached, if any."""
        trainer = self.trainer
        if trainer.max_steps not in (None, -1) and state.get("global_step", 0) >= \
                trainer.max_steps:
            return f"its {trainer.max_steps} steps (--trainer.max_steps)"
        progress = state.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
        epochs = progress.get("current", {}).get("processed", 0)
        if trainer.max_epochs not in (None, -1) and epochs >= trainer.max_epochs:
            return f"its {trainer.max_epochs} epochs (--trainer.max_epochs)"
        return None


def main(args: list[str] | None = None) -> CLI | None:
    """Run ``train.py`` with ``args`` (default: the command line). A run that cannot go
    on ends with one line on stderr and exit status 1; resuming a finished run, with one
    line and status 0 (and returns None)."""
    try:
        cli = CLI(DigitModel, MNISTDataModule, subclass_mode_model=True,
                  seed_everything_default=0, args=args)
    except RunFinished as done:
        print(f"manual_grad: {done}", flush=True)
        return None
    except (RunError, CheckpointError) as err:
        sys.stderr.write(f"train.py: error: {err}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
    # Lightning leaves a DDP run's process group alive; left to the interpreter's exit,
    # gloo's worker threads can abort the process (SIGABRT, "terminate called without an
    # active exception"). Destroyed here, on success only: after an error another rank may
    # still be inside a collective, and destroying would hang it.
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return cli


__all__ = ["CLI", "Parser", "RunFinished", "main"]
