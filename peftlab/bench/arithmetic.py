"""Merging a Rotten Tomatoes adapter with an IMDB adapter: does the merge keep both skills?

``python -m peftlab.bench.arithmetic [--quick] [--seed 0] [--fp32] [--json PATH] [--md PATH]``

One MiniLM (all-MiniLM-L6-v2, fresh 2-way head) carries every adapter.  The recipe is the reference
table's LoRA row (``peftlab.bench.table``): r = 8, alpha = 16 on query/value, the head trained as a
``modules_to_save`` copy, lr 2e-3, batch 32, one epoch, 6 % warm-up then linear decay.

* ``rt``: trained on Rotten Tomatoes' training split (max length 64);
* ``imdb``: trained on a stratified IMDB subsample of the same size (max length 128: reviews are cut
  to their first 128 tokens, which keeps the full run within ~12 CPU minutes);
* ``multi-task``: trained on the union of both training sets, so it sees exactly the examples the two
  single adapters saw together (as many steps as both runs together);
* merges of ``rt`` and ``imdb`` with ``peftlab.arithmetic.add_weighted_adapter``, all with
  ``head="mean"`` (both heads score neg/pos, from the same initial head): linear 0.5/0.5 and 1/1,
  cat 1/1 (the exact sum of the two updates: task arithmetic), svd rank 8 of that sum, ties at
  density 0.5 (weights 1/1).

Each is scored on Rotten Tomatoes' test split and on a stratified IMDB test subsample (2,000
reviews by default).  The full run writes ``data/results/arithmetic.json`` and ``.md``; ``--quick``
trains on a few hundred examples for a few steps (a smoke test of the pipeline, numbers near
chance) and prints the table, plus a time estimate of the full run from its own speed.  bf16
autocast is on by default (``--fp32`` turns it off).  Explained in
notebooks/12_adapter_arithmetic.ipynb.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["ArithmeticSettings", "MERGES", "run", "format_markdown", "estimate_full_seconds", "main"]

# adapter name -> (row label, combination_type, weights, extra keyword arguments of add_weighted_adapter)
MERGES = {
    "linear_half": ("linear 0.5/0.5", "linear", [0.5, 0.5], {}),
    "linear_sum": ("linear 1/1", "linear", [1.0, 1.0], {}),
    "cat_sum": ("cat 1/1 (task arithmetic)", "cat", [1.0, 1.0], {}),
    "svd_sum": ("svd r=8 of the sum", "svd", [1.0, 1.0], {"svd_rank": 8}),
    "ties_sum": ("ties d=0.5", "ties", [1.0, 1.0], {"density": 0.5}),
}


@dataclass
class ArithmeticSettings:
    train_size: int | None = None  # examples per single adapter; None: all of Rotten Tomatoes' train split
    rt_test_size: int | None = None  # None: the whole Rotten Tomatoes test split
    imdb_test_size: int = 2000  # stratified IMDB test subsample
    rt_max_length: int = 64  # Rotten Tomatoes sentences are ~27 tokens
    imdb_max_length: int = 128  # IMDB reviews are ~300 tokens: cut to their first 128
    max_steps: int | None = None  # per single adapter (the multi-task run gets twice this); None: one epoch
    batch_size: int = 32
    lr: float = 2e-3
    r: int = 8
    alpha: float = 16
    seed: int = 0
    bf16: bool = True  # autocast on the CPU (fast on CPUs with AMX / AVX-512 BF16)

    @classmethod
    def quick(cls, **kw) -> "ArithmeticSettings":
        return cls(**{"train_size": 192, "rt_test_size": 128, "imdb_test_size": 128, "max_steps": 6, **kw})


def _log(msg: str) -> None:
    print(f"[arithmetic {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(s: ArithmeticSettings) -> dict:
    """Train, merge and score as the module docstring says; return the JSON-ready result."""
    import torch
    from datasets import concatenate_datasets

    import peftlab
    from peftlab import runtime
    from peftlab.arithmetic import add_weighted_adapter
    from peftlab.data import stratified_subset, tokenize_classification
    from peftlab.metrics import evaluate_classifier

    t0 = time.perf_counter()
    runtime.use_physical_cores()
    rt = peftlab.load_sentiment("rotten_tomatoes", seed=s.seed)
    imdb = peftlab.load_sentiment("imdb", seed=s.seed)
    n = s.train_size or len(rt["train"])
    rt_train = stratified_subset(rt["train"], n, s.seed)
    imdb_train = stratified_subset(imdb["train"], n, s.seed)
    rt_test = stratified_subset(rt["test"], s.rt_test_size, s.seed) if s.rt_test_size else rt["test"]
    imdb_test = stratified_subset(imdb["test"], s.imdb_test_size, s.seed)
    model, tok = peftlab.load_model("minilm", task="classification", num_labels=2, seed=s.seed)
    data = {
        "rt": (tokenize_classification(rt_train, tok, s.rt_max_length),
               tokenize_classification(rt_test, tok, s.rt_max_length)),
        "imdb": (tokenize_classification(imdb_train, tok, s.imdb_max_length),
                 tokenize_classification(imdb_test, tok, s.imdb_max_length)),
    }
    union = concatenate_datasets([data["rt"][0], data["imdb"][0]])
    _log(f"data: {n} train examples per task, test {len(rt_test)} RT / {len(imdb_test)} IMDB "
         f"({time.perf_counter() - t0:.0f} s)")
    amp = torch.bfloat16 if s.bf16 else None
    trained = {}
    for name, train_set, steps in (("rt", data["rt"][0], s.max_steps), ("imdb", data["imdb"][0], s.max_steps),
                                   ("multi-task", union, 2 * s.max_steps if s.max_steps else None)):
        peftlab.seed_everything(s.seed)  # the same adapter init and head copy for every run
        peftlab.inject(model, peftlab.LoRAConfig(r=s.r, alpha=s.alpha, target_modules=("query", "value"),
                                                 modules_to_save=("classifier",)), name=name)
        cfg = peftlab.TrainConfig(lr=s.lr, batch_size=s.batch_size, epochs=1, max_steps=steps, warmup=0.06,
                                  schedule="linear", seed=s.seed, progress=False,
                                  precision="bf16" if s.bf16 else "fp32")
        result = peftlab.train(model, train_set, None, cfg)
        trained[name] = {"examples": len(train_set), "steps": result.steps, "train_seconds": result.train_seconds}
        _log(f"trained {name}: {result.steps} steps in {result.train_seconds:.0f} s")
    names = {"rt": "rt only", "imdb": "imdb only", "multi-task": "multi-task (union)"}
    for adapter, (label, kind, weights, kw) in MERGES.items():
        add_weighted_adapter(model, ["rt", "imdb"], weights, adapter, kind, head="mean", **kw)
        names[adapter] = label
    table, eval_seconds = [], 0.0
    for adapter, label in names.items():
        peftlab.set_active(model, adapter)
        t = time.perf_counter()
        acc = {task: evaluate_classifier(model, data[task][1], autocast_dtype=amp)["accuracy"]
               for task in ("rt", "imdb")}
        eval_seconds += time.perf_counter() - t
        table.append({"adapter": label, "rank": _rank(model, adapter), "rt_accuracy": acc["rt"],
                      "imdb_accuracy": acc["imdb"], "mean_accuracy": (acc["rt"] + acc["imdb"]) / 2})
        _log(f"{label:28s} RT {acc['rt']:.3f}  IMDB {acc['imdb']:.3f}")
    seconds = time.perf_counter() - t0
    return {"settings": asdict(s), "trained": trained, "rows": table, "seconds": seconds,
            "eval_seconds": eval_seconds, "train_examples": n, "rt_train_split": len(rt["train"]), "rt_test_split": len(rt["test"]), "rt_test": len(rt_test), "imdb_test": len(imdb_test),
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()}}


def _rank(model, adapter: str) -> int:
    from peftlab.registry import configs

    return configs(model)[adapter].r


def estimate_full_seconds(result: dict, full: ArithmeticSettings) -> float:
    """Seconds a full run would take at this run's speed per trained example and per scored example
    (training: one epoch of each single adapter plus the union; scoring: every row on both test sets)."""
    tr = result["trained"]
    per_rt = tr["rt"]["train_seconds"] / max(1, tr["rt"]["steps"] * result["settings"]["batch_size"])
    per_imdb = tr["imdb"]["train_seconds"] / max(1, tr["imdb"]["steps"] * result["settings"]["batch_size"])
    n = full.train_size or result["rt_train_split"]
    train = 2 * n * (per_rt + per_imdb)  # single adapters, then the union once more
    scored = result["rt_test"] + result["imdb_test"]
    full_scored = (full.rt_test_size or result["rt_test_split"]) + full.imdb_test_size
    return train + result["eval_seconds"] * full_scored / max(1, scored)


def format_markdown(result: dict) -> str:
    s = result["settings"]
    lines = ["| adapter | rank | Rotten Tomatoes acc. | IMDB acc. | mean |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['adapter']} | {r['rank']} | {r['rt_accuracy']:.3f} | {r['imdb_accuracy']:.3f} | "
                     f"{r['mean_accuracy']:.3f} |")
    tr = result["trained"]
    lines += ["", f"Made by `python -m peftlab.bench.arithmetic` in {result['seconds'] / 60:.1f} min "
              f"(seed {s['seed']}, {'bf16 autocast' if s['bf16'] else 'fp32'}, torch {result['machine']['torch']}, "
              f"{result['machine']['threads']} threads). MiniLM, LoRA r={s['r']}, alpha={s['alpha']:g} on "
              f"query/value + a trained head copy; lr {s['lr']:g}, batch {s['batch_size']}, one epoch. Single "
              f"adapters: {result['train_examples']} examples each ({tr['rt']['steps']} steps; max length "
              f"{s['rt_max_length']} RT, {s['imdb_max_length']} IMDB); multi-task: their union "
              f"({tr['multi-task']['steps']} steps). Test: {result['rt_test']} RT, {result['imdb_test']} IMDB "
              "(stratified). Merges of rt and imdb use `head=\"mean\"`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m peftlab.bench.arithmetic", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of 1-2 minutes (numbers near chance)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--json", type=Path, default=None, help="default: data/results/arithmetic.json (full run)")
    parser.add_argument("--md", type=Path, default=None, help="default: beside the JSON, .md")
    args = parser.parse_args(argv)
    kw = {"seed": args.seed, "bf16": not args.fp32}
    s = ArithmeticSettings.quick(**kw) if args.quick else ArithmeticSettings(**kw)
    result = run(s)
    text = format_markdown(result)
    print(text)
    if args.quick:
        _log(f"estimated full run at this speed: {estimate_full_seconds(result, ArithmeticSettings(**kw)) / 60:.1f}"
             " min (training + scoring; loading adds ~1 min)")
    path = args.json
    if path is None and not args.quick:
        from peftlab.data import data_dir

        path = data_dir() / "results" / "arithmetic.json"
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        md = args.md or path.with_suffix(".md")
        md.write_text(text)
        _log(f"wrote {path} and {md}")


if __name__ == "__main__":
    main()
