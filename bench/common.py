"""Shared by the benchmarks: interleaved timing, machine description, table output."""

import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timings(dict[str, list[float]]):
    """Seconds per call of each fn, one entry per round (rounds line up across fns)."""

    def median(self, name: str) -> float:
        return statistics.median(self[name])

    def ratio(self, name: str, base: str) -> float:
        """Median over rounds of name's time over base's *in the same round*: the machine's
        speed drifts (a shared 2-core VM here: +-30% over minutes), and pairing each
        time with its neighbour cancels what the two rounds share."""
        return statistics.median(a / b for a, b in zip(self[name], self[base], strict=True))


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 7,
                warmup: int = 2) -> Timings:
    """Each fn timed once per round, ``repeats`` rounds. The fns take turns, and the order
    rotates each round, so drift and the after-effects of one fn (a large allocation, a
    cold cache) fall on every fn alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = Timings({name: [] for name in fns})
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = fns[name]
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        what = f"{cpu} CPU, {torch.get_num_threads()} threads"
    return f"{what}; torch {torch.__version__}; {date.today().isoformat()}"


def table(title: str, header: list[str], rows: list[list[str]], device: torch.device,
          name: str) -> str:
    lines = [f"### {title}", "", f"Machine: {machine(device)}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}-{device.type}.md").write_text(text)
    return text


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def devices() -> list[torch.device]:
    """CPU, and CUDA when present; BENCH_DEVICES=cuda (or cpu) picks one."""
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found.append(torch.device("cuda"))
    wanted = os.environ.get("BENCH_DEVICES")
    return [d for d in found if wanted is None or d.type in wanted.split(",")]
