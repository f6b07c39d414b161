"""The capstone's run, repeated: ``python -m peftlab.bench.chat [--quick] [--seeds 0,1] [--tables N] [--json PATH]``.

Runs exactly the recipe of ``notebooks/13_capstone_instruction_tuning.ipynb`` (``peftlab.chat.run_recipe``
with ``peftlab.chat.recipe(quick, seed)``: SmolLM2-135M-Instruct, LoRA r=8 on every linear layer,
chat-formatted E2E with the loss on the assistant's tokens only, BLEU / ROUGE-L on held-out test tables
before and after) once per seed, and reports the scores, their spread over the seeds and whether every
seed's BLEU lies within ``STABLE_BLEU`` of the mean (the issue's "stable within +-2 BLEU on a re-run").
A seed changes the training rows, their order and LoRA's start; the same seed twice (``--seeds 0,0``)
repeats the run exactly (greedy decoding, seeded everything). The full run writes
``data/results/chat.json`` and ``chat.md``; ``--quick`` writes nothing unless ``--json`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

__all__ = ["STABLE_BLEU", "bench_chat", "format_chat", "default_path", "main"]

STABLE_BLEU = 2.0  # every seed's BLEU after training within this of the mean


def bench_chat(seeds: tuple[int, ...] = (0, 1), quick: bool = False, log=print, tables: int | None = None) -> dict:
    """``run_recipe`` for each seed; per-seed results and a summary with the spread.

    ``tables``: score on this many held-out test tables instead of the recipe's ``eval_tables`` (more
    tables shrink the scoring noise; the training is unchanged).
    """
    from peftlab import chat, runtime

    if not seeds:
        raise ValueError("seeds must name at least one seed, e.g. (0, 1)")
    if tables is not None and (not isinstance(tables, int) or tables < 1):
        raise ValueError(f"tables must be a positive number of test tables, got {tables!r}: e.g. 60")
    override = {} if tables is None else {"eval_tables": tables}
    runtime.use_physical_cores()
    start = time.perf_counter()
    runs = []
    for seed in seeds:
        plan = dataclasses.replace(chat.recipe(quick, seed), **override)
        run = chat.run_recipe(plan, log=log)
        run["before"].pop("replies")
        run["examples"] = run["after"].pop("replies")[:3]
        runs.append(run)
    after = [r["after"]["bleu"] for r in runs]
    mean = statistics.fmean(after)
    summary = {"bleu_before": [r["before"]["bleu"] for r in runs], "bleu_after": after,
               "rouge_l_after": [r["after"]["rouge_l"] for r in runs], "bleu_after_mean": mean,
               "bleu_after_std": statistics.stdev(after) if len(after) > 1 else 0.0,
               "bleu_after_spread": max(after) - min(after),
               "stable": all(abs(b - mean) <= STABLE_BLEU for b in after),
               "wall_s_per_run": [r["wall_s"] for r in runs]}
    return {"settings": {**dataclasses.asdict(chat.recipe(quick)), **override, "seeds": list(seeds), "quick": quick,
                         "model": "SmolLM2-135M-Instruct"},
            "runs": runs, "summary": summary, "wall_s": time.perf_counter() - start}


def format_chat(result: dict) -> str:
    s, m = result["settings"], result["summary"]
    lines = [f"Capstone recipe (notebook 13): LoRA r={s['r']} on {s['target_modules']}, {s['steps']} steps x "
             f"{s['batch_size']} conversations, {s['precision']}; BLEU / ROUGE-L on {s['eval_tables']} held-out "
             f"test tables", "",
             "| seed | BLEU before | ROUGE-L before | BLEU after | ROUGE-L after | final train loss | held-out loss "
             "| train s | run s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['seed']} | {r['before']['bleu']:.1f} | {r['before']['rouge_l']:.3f} | {r['after']['bleu']:.1f} "
                     f"| {r['after']['rouge_l']:.3f} | {r['losses'][-1]:.3f} | {r['eval_loss']:.3f} "
                     f"| {r['train_s']:.0f} | {r['wall_s']:.0f} |")
    lines += ["", f"BLEU after: mean {m['bleu_after_mean']:.1f}, std {m['bleu_after_std']:.2f}, spread (max - min) "
                  f"{m['bleu_after_spread']:.2f}; every seed within ±{STABLE_BLEU:g} of the mean: {m['stable']}",
              "", f"whole run {result['wall_s'] / 60:.1f} min"]
    return "\n".join(lines)


def default_path() -> Path:
    from peftlab.data import data_dir

    return data_dir() / "results" / "chat.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftlab.bench.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick (CI) recipe: a few steps and tables")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--tables", type=int, default=None,
                        help="score on this many held-out test tables (default: the recipe's, 40)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the JSON (and .md beside it); "
                        "by default only the full run with the recipe's own settings writes data/results/chat.json")
    args = parser.parse_args(argv)
    if args.tables is not None and args.tables < 1:
        parser.error(f"--tables {args.tables}: give a positive number of test tables, e.g. 60")
    try:
        seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. 0,1")
    result = bench_chat(seeds, quick=args.quick, tables=args.tables)
    text = format_chat(result)
    print(text)
    path = args.json or (None if args.quick or args.tables is not None else default_path())
    if path is not None:
        from peftlab import atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(result, indent=1))
        atomic.write_text(path.with_suffix(".md"), text + "\n")
        print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
