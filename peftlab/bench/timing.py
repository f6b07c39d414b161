"""Timing several variants fairly on one machine: balanced order, many rounds, CPU time.

A shared machine drifts (other jobs, frequency scaling, a warming cache). Timing variant A
five times and then B five times puts all of that drift on one side. Here every round times
each variant once; the order rotates by one each round and is reversed every other round, so
over an even number of rounds each variant runs equally often in each position and before /
after each other variant (an ABBA design generalised to k variants). On the CPU the clock is
the process CPU time (all threads), which other processes disturb far less than wall time;
on CUDA it is wall time with synchronisation. Each variant's median is reported with its
spread (min, quartiles, max), so a reader sees how much to trust a ratio.

Used by ``peftlab.bench.lora`` (LoRA step and inference timings) and ``peftlab.bench.table``
(the step-time column of the reference table).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Sequence

import torch

__all__ = ["balanced_orders", "interleaved_times", "summary", "autocast", "train_step"]


def autocast(device: str, bf16: bool):
    """bf16 autocast on ``device`` ("cpu", "cuda", "cuda:1"), or nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def train_step(model: torch.nn.Module, batch: dict, device: str, bf16: bool) -> Callable[[], None]:
    """One AdamW training step of ``model`` on ``batch`` as a callable, for timing (model put in train mode)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with autocast(device, bf16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def balanced_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The order in which each round times ``names``: rotated each round, reversed every other."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds!r}")
    names = list(names)
    orders = []
    for r in range(rounds):
        shift = (r // 2) % len(names) if names else 0
        order = names[shift:] + names[:shift]
        orders.append(order if r % 2 == 0 else order[::-1])
    return orders


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median, min, quartiles and max of a list of timings (seconds)."""
    if not samples:
        raise ValueError("no samples to summarise")
    q = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else [samples[0]] * 3
    return {"median": statistics.median(samples), "min": min(samples), "q1": q[0], "q3": q[2],
            "max": max(samples), "rounds": len(samples)}


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int = 15, reps: int = 1, warmup: int = 1,
                      device: str = "cpu") -> dict[str, dict[str, dict[str, float]]]:
    """Seconds per call of each function, timed round by round in ``balanced_orders``.

    Returns ``{"cpu": {name: summary}, "wall": {name: summary}}``; ``"cpu"`` is the process
    CPU time per call (on CUDA the CPU clock says little about the GPU: use ``"wall"``).
    """
    import torch

    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps!r}, warmup={warmup!r}")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):  # lazy initialisation, allocator growth
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for order in balanced_orders(list(fns), rounds):
        for name in order:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(reps):
                fns[name]()
            sync()
            wall[name].append((time.perf_counter() - t0) / reps)
            cpu[name].append((time.process_time() - c0) / reps)
    return {"cpu": {k: summary(v) for k, v in cpu.items()}, "wall": {k: summary(v) for k, v in wall.items()}}
