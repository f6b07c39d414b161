"""Benchmarks: ``python -m peftlab.bench lora|speed|e2e|mixed [options]`` (see each mode's module).

* ``lora [--device cuda] [--bf16] [--random-init] [--json PATH]``: the LoRA micro-benchmark
  (``peftlab.bench.lora``, explained in notebooks/03_lora.ipynb);
* ``speed [--rounds 2] [--quick] [--json PATH]``: the training loop against HF Trainer + peft
  (``peftlab.bench.speed``, notebooks/07_training.ipynb);
* ``e2e [--seeds 0,1,2] [--methods prefix,prefix-random,prompt,lora] [--quick] [--json PATH]
  [--reuse PATH]``: prefix-tuning (text or random start), prompt tuning, LoRA and QLoRA (``qlora``:
  LoRA over the NF4 base) on SmolLM2 / E2E at one budget, scored by BLEU, with training curves,
  time and peak memory (``peftlab.bench.e2e``, notebooks/04_prefix_tuning.ipynb);
* ``mixed [--quick] [--json PATH]``: serving k = 1, 4, 16 LoRA adapters from one model in a mixed
  batch vs each adapter's rows separately vs k merged copies, MiniLM classification and SmolLM2
  generation, rows/s and memory (``peftlab.bench.mixed``, notebooks/11_serving_many_adapters.ipynb);
  the full run writes data/results/mixed.json and .md;
* ``_mem KIND``: internal, the fresh process in which ``lora`` measures one configuration's
  CPU memory.

The reference table is ``peftlab bench`` (``peftlab.bench.table``); throughput and serving
latency are ``python -m peftlab.bench.throughput prefix|serve``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftlab.bench", description=__doc__.split("\n")[0])
    parser.add_argument("which", choices=["lora", "speed", "e2e", "mixed", "_mem"], help="benchmark to run")
    parser.add_argument("--rounds", type=int, default=1, help="speed: rounds of the A B / B A order")
    parser.add_argument("--quick", action="store_true", help="speed, e2e, mixed: a small subset (a smoke test)")
    parser.add_argument("--seeds", default="0,1,2", help="e2e: comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--methods", default="prefix,prefix-random,prompt,lora",
                        help="e2e: comma-separated, from prefix, prefix-random, prompt, lora, qlora")
    parser.add_argument("kind", nargs="?", default="lora", help=argparse.SUPPRESS)  # for the _mem child
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (meant for CUDA)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    parser.add_argument("--reuse", type=Path, help="e2e: take over the runs of this earlier JSON that have the same "
                                                   "budget, method and seed instead of training them again")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--random-init", action="store_true", help="MiniLM's architecture with random weights")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.which == "_mem":
        from peftlab.bench.lora import memory_child

        print(json.dumps(memory_child(args.kind, args.batch, args.seq, 3, args.random_init)))
        return 0
    if args.which == "mixed":
        from peftlab.bench.mixed import main as mixed_main

        return mixed_main(args.quick, args.json)
    if args.which == "speed":
        from peftlab.bench.speed import bench_speed, format_speed

        if args.rounds < 1:
            parser.error(f"--rounds must be >= 1, got {args.rounds}")
        result = bench_speed(quick=args.quick, rounds=args.rounds)
        print(format_speed(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return 0
    if args.which == "e2e":
        from peftlab.bench.e2e import REFERENCE_METHODS, bench_e2e, default_path, format_e2e

        try:
            seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
        except ValueError:
            parser.error(f"--seeds must be comma-separated integers such as 0,1; got {args.seeds!r}")
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        try:
            earlier = json.loads(args.reuse.read_text()) if args.reuse else None
            result = bench_e2e(seeds=seeds, methods=methods, quick=args.quick, reuse=earlier)
        except ValueError as err:
            parser.error(str(err))
        table = format_e2e(result)
        print(table)
        reference_run = methods == REFERENCE_METHODS and seeds == (0, 1, 2) and not args.quick  # notebook 04 reads it
        out = args.json or (default_path() if reference_run else None)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2))
            out.with_suffix(".md").write_text(table + "\n")
        return 0
    import torch

    from peftlab.bench.lora import bench_lora, format_table

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    result = bench_lora(args.device, args.bf16, args.batch, args.seq, random_init=args.random_init)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0
