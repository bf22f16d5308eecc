"""Whether ``FusedMLP.mse_loss(X, Y, rows=idx)``'s batch-4096 ratio depends on where a
small VM's CPUs sit: a time series of that ratio beside a probe of the CPU's cache sharing.

``rows=`` used to gather each ~4 MB chunk of the batch with both threads and then multiply
it with both threads, which split the rows differently, so each core read rows the other
one wrote: cheap while the two cores share a last-level cache, a trip across the machine
when they do not, and a VM's virtual CPUs can be moved between such placements while it
runs. The ratio followed the probe (0.75-0.88 against 0.90-1.03). Since a large batch is
cut into one block of rows per thread, multiplied as a batched product
(``single_pass._blocks_and_chunk``), each thread multiplies the rows it gathered and the
ratio no longer follows the probe. torch.nn reads its batch from memory either way.

Every window of a few seconds prints the median ratio of ``rows=`` to torch.nn (the two
take turns, as in ``train_step``) and the probe: the time to read 4 MB that the *other*
CPU has just written, against 4 MB the same CPU has written (one thread each, CPUs
pinned for the probe alone). Linux only (it pins with ``os.sched_setaffinity``).

    python -m bench.cache_regimes --seconds 120
"""

import argparse
import os
import statistics
import time

import torch
from torch import nn

from bench.common import add_save_flag, table
from bench.train_step import N_EPOCH, steps_fn


def cross_core_read(first: int, second: int, buffer: torch.Tensor) -> float:
    """Seconds to read ``buffer`` on CPU ``second`` right after CPU ``first`` wrote it."""
    threads, cpus = torch.get_num_threads(), os.sched_getaffinity(0)
    try:
        torch.set_num_threads(1)
        os.sched_setaffinity(0, {first})
        buffer.fill_(1.0)
        os.sched_setaffinity(0, {second})
        start = time.perf_counter()
        buffer.sum()
        return time.perf_counter() - start
    finally:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--window", type=float, default=5.0, help="seconds per printed row")
    parser.add_argument("--batch", type=int, default=4096)
    args = add_save_flag(parser).parse_args()
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("bench.cache_regimes needs Linux and at least two CPUs to pin")
    a, b = sorted(os.sched_getaffinity(0))[:2]
    torch.manual_seed(0)
    X = torch.randn(N_EPOCH, 784)
    Y = torch.randint(0, 10, (N_EPOCH,)).float()
    steps = max(3, 60 * 64 // args.batch)
    fns = {"native": steps_fn(nn, X, Y, args.batch, steps),
           "rows": steps_fn("fused rows", X, Y, args.batch, steps)}
    buffer = torch.empty(1 << 20)  # 4 MB of float32, one rows= chunk
    for fn in fns.values():  # warm-up
        fn()
    rows, start = [], time.time()
    while time.time() - start < args.seconds:
        times: dict[str, list[float]] = {"native": [], "rows": [], "other": [], "same": []}
        window_end = time.time() + args.window
        turn = 0
        while time.time() < window_end:
            names = list(fns) if turn % 2 == 0 else list(fns)[::-1]  # alternate who is first
            turn += 1
            for name in names:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
            times["other"].append(cross_core_read(a, b, buffer))
            times["same"].append(cross_core_read(a, a, buffer))
        ratio = statistics.median(r / n for r, n in zip(times["rows"], times["native"],
                                                        strict=True))
        rows.append([f"{time.time() - start:.0f}", f"{ratio:.3f}",
                     f"{statistics.median(times['native']) / steps * 1e3:.2f}",
                     f"{statistics.median(times['other']) * 1e3:.3f}",
                     f"{statistics.median(times['same']) * 1e3:.3f}"])
        print(" | ".join(rows[-1]), flush=True)
    table(f"rows= against torch.nn at batch {args.batch}, with a cache-sharing probe, in "
          f"{args.window:.0f}-second windows",
          ["t (s)", "rows= / torch.nn", "torch.nn ms/step", "read 4 MB the other CPU wrote, ms",
           "read 4 MB the same CPU wrote, ms"], rows, torch.device("cpu"), "cache_regimes")


if __name__ == "__main__":
    main()
