"""The private torch and Lightning APIs manual_grad uses live in manual_grad/_compat.py alone;
each is still there on the installed versions (a release that drops one fails the test that
names it), and with every fallback forced the package still gives the same results."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import manual_grad
from manual_grad import _compat

ROOT = Path(__file__).resolve().parents[1]

INTERNALS = [
    "torch._C._is_any_autocast_enabled",
    "torch._C._are_functorch_transforms_active",
    "torch._C._functorch.is_functorch_wrapped_tensor",
    "torch._C._functorch.is_legacy_batchedtensor",
    "torch._guards.TracingContext.try_get",
    "torch._C._functorch.peek_interpreter_stack",
    "torch.autograd.forward_ad._current_level",
    "torch._C._nn.mse_loss",
    "torch.nn._reduction.legacy_get_string",
    "torch._foreach_mul_",
    "torch.nn.Module._parameters",
    "torch.autograd.Function._backward_cls",
    "torch._inductor.compile",
    "lightning.pytorch.utilities.model_helpers.is_overridden",
    "lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler",
    "lightning LightningOptimizer._on_before_step/_on_after_step",
]


def _use_the_lazy_ones() -> None:
    from lightning.pytorch.core.optimizer import LightningOptimizer

    _compat.is_overridden("training_step", manual_grad.training.MNISTRegressor(in_features=4))
    _compat.unrepeated_sampler(range(5), num_replicas=2, rank=0)
    _compat.step_count_hooks(LightningOptimizer(torch.optim.SGD([torch.zeros(1)], lr=1.0)))
    _compat.inductor_compile()


@pytest.mark.skipif(_compat.FORCED, reason="the fallbacks are forced in this process")
@pytest.mark.parametrize("name", INTERNALS)
def test_each_internal_is_there_on_the_installed_torch_and_lightning(name):
    import manual_grad.training  # noqa: F401

    _use_the_lazy_ones()
    assert _compat.FOUND.get(name) is True, (
        f"{name} is missing on torch {torch.__version__}: manual_grad runs on its fallback "
        "(see manual_grad/_compat.py); adapt _compat to the new API")


def test_the_list_above_is_every_internal_compat_reaches_for():
    import manual_grad.training  # noqa: F401

    _use_the_lazy_ones()
    assert sorted(_compat.FOUND) == sorted(INTERNALS)


# what reaching past a public API looks like in the source
PRIVATE = re.compile(r"torch\._[A-Za-z]|\._parameters\b|_backward_cls|lightning\.pytorch\."
                     r"overrides|model_helpers|_on_before_step|_on_after_step|\.fit_loop\.|"
                     r"self\._get\(|self\._parser\(")  # (the last two: LightningCLI's)


def test_no_module_but_compat_reaches_for_an_internal():
    offenders = []
    for path in sorted((ROOT / "manual_grad").rglob("*.py")):
        if path.name == "_compat.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = re.sub(r'"[^"]*"|\'[^\']*\'', '""', line.split("#", 1)[0])
            if PRIVATE.search(code) and '"""' not in code and "``" not in code:
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.skipif(_compat.FORCED, reason="this is the process it starts")
def test_the_fallbacks_alone_give_the_same_results():
    """The core of the suite, in a process where every internal reads as missing. (Not
    compiled forward mode: without torch's interpreter stack, Dynamo cannot be shown a
    Function's jvp only when forward mode is on, so the fallback hides it from Dynamo and
    a compiled jvp of manual_grad layers is refused; plain compile keeps working.)"""
    env = {**os.environ, "MANUAL_GRAD_COMPAT_FALLBACKS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "tests/test_compat.py::test_every_fallback_is_in_use",
         "tests/test_drop_in.py", "tests/test_mse.py", "tests/test_linear.py",
         "tests/test_forward_ad.py", "tests/test_training.py::"
         "test_several_steps_per_lightning_step_take_the_same_steps",
         "tests/test_library.py", "-k", "not compiled_jvp and not gradcheck and not meta"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout


@pytest.mark.skipif(not _compat.FORCED, reason="run by the test above, with the fallbacks")
def test_every_fallback_is_in_use():
    import manual_grad.training  # noqa: F401

    _use_the_lazy_ones()
    assert _compat.FOUND and not any(_compat.FOUND.values()), _compat.FOUND
