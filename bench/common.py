"""Shared by the benchmarks: interleaved timing, machine description, table output."""

import argparse
import ctypes
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse rather than return it to the OS.

    By default a freed block over ~128 KB may go back to the OS (trimmed or unmapped), so
    the next step's allocation of it page-faults afresh: at batch 4096 a step's 12.8 MB
    gathered batch then costs 2,000-3,000 page faults, 2-4 ms of a ~10 ms step. Which of
    the interleaved contenders pays depends on the allocation history, so ratios jumped
    by up to 30% between runs. Holding freed memory (as PyTorch's CPU tuning guide's
    jemalloc/tcmalloc advice does too) removes that from both sides alike. Returns
    whether it was applied (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
                    and libc.mallopt(M_MMAP_THRESHOLD, 32 << 20))  # 32 MB: glibc's maximum
    except (OSError, AttributeError):
        return False


MALLOC_KEEPS_FREED = keep_freed_memory()  # on import: every benchmark imports this module


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


def cpu_caches() -> str:
    """The first CPU's caches as Linux lists them ("L1d 48K, L1i 32K, L2 2048K, L3 ..."),
    or "" where /sys does not say: a CPU figure here depends on them."""
    found = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / f).read_text().strip()
                                 for f in ("level", "type", "size"))
        except OSError:
            continue
        found.append(f"L{level}{'d' if kind == 'Data' else 'i' if kind == 'Instruction' else ''}"
                     f" {size}")
    return ", ".join(found)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        what = f"{cpu} CPU, {torch.get_num_threads()} threads"
        caches = cpu_caches()
        if caches:
            what += f" (caches per core or shared: {caches})"
        if MALLOC_KEEPS_FREED:
            what += ", malloc keeps freed memory"
    return f"{what}; torch {torch.__version__}; {date.today().isoformat()}"


def saving() -> bool:
    """Whether the tables are to be written to bench/results/ (the --save flag, which every
    bench's parser takes): without it a bench only prints, and the checkout stays clean."""
    return "--save" in sys.argv[1:]


def add_save_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--save", action="store_true",
                        help="also write the tables to bench/results/ (tracked files)")
    return parser


def table(title: str, header: list[str], rows: list[list[str]], device: torch.device,
          name: str | None) -> str:
    """Print a markdown table with its machine; with --save and a name, also write it to
    bench/results/NAME-DEVICE.md."""
    lines = [f"### {title}", "", f"Machine: {machine(device)}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if name is not None and saving():
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
