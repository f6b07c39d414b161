"""The course's reference table: every method on MiniLM / Rotten Tomatoes, trained to convergence.

``peftlab bench [--quick] [--device cuda] [--bf16] [--seeds 0,1,2]`` trains each method of
``peftlab.methods.METHODS`` for one full epoch (batch 32, max length 64, linear decay after a
6 % warm-up, the method's own learning rate from ``peftlab.methods.LEARNING_RATES``) once per
seed, scores the whole test split, and writes ``data/results/benchmark.md`` and
``benchmark.json`` with, per method: trainable parameters and share, test accuracy and F1 as
mean ± std over the seeds, train step time / full fine-tuning, peak training memory / full
fine-tuning, inference latency / base model and the size of what must be stored after training.

* Every (method, seed) runs in its own fresh Python process: a process's peak resident memory
  is a lifetime maximum, so only a fresh process measures one method's training alone. Memory
  is the peak RSS growth from just before the model load (weights + gradients + optimizer
  state + activations) on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
* Step times come from a separate timing process that holds every method's model at once and
  times one training step of each on the same real batch, round after round, in a balanced
  order (the order rotates each round and reverses every other round), as **process CPU
  time** on the CPU (less sensitive than wall time to other jobs on a shared machine) and as
  synchronised wall time on CUDA; the median over the rounds is reported, with its spread.

Explained in ``notebooks/07_training.ipynb``, section "The reference table".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from peftlab.methods import LEARNING_RATES, TRAIN_OPTIONS

__all__ = ["BenchSettings", "run_bench", "format_markdown", "reference", "LABELS"]

LABELS = {
    "head": "head only (frozen body)", "full": "full fine-tuning", "peft-lora": "HF peft LoRA",
    "lora": "peftlab LoRA", "prefix": "prefix-tuning (flat)", "prompt": "prompt tuning",
    "houlsby": "Houlsby adapters", "pfeiffer": "Pfeiffer adapters", "dora": "DoRA",
    "lora-plus": f"LoRA+ (B at {TRAIN_OPTIONS['lora-plus']['loraplus_ratio']:g}x lr)",
    "qlora": "QLoRA (NF4 body)", "ia3": "IA³",
}
WARMUP = 0.06  # share of the steps


@dataclass
class BenchSettings:
    """The one budget every method gets."""

    epochs: int = 1  # full passes over the training split
    max_steps: int | None = None  # set only to cut runs short (quick mode)
    batch_size: int = 32  # examples per step
    max_length: int = 64  # tokens per sentence (Rotten Tomatoes sentences are ~27 tokens)
    train_size: int | None = None  # None: the whole training split (6,823 sentences)
    test_size: int | None = None  # None: the whole test split (853 sentences)
    seeds: tuple[int, ...] = (0, 1, 2)  # each seed: its own data split order, head and adapter init
    r: int = 8  # LoRA rank (query, value) for both LoRA rows
    alpha: float = 16
    prefix_length: int = 16  # virtual tokens for prefix and prompt tuning
    bottleneck: int = 32  # adapters
    device: str = "cpu"
    bf16: bool = False
    latency_batch: int = 32
    latency_repeats: int = 15
    timing_rounds: int = 16  # rounds of the balanced step-time measurement (even: whole ABBA pairs)
    threads: int | None = None  # CPU threads per process; None: one per physical core
    lr: dict[str, float] = field(default_factory=lambda: dict(LEARNING_RATES))

    def __post_init__(self) -> None:
        self.seeds = tuple(int(x) for x in self.seeds)
        if not self.seeds:
            raise ValueError("BenchSettings.seeds must name at least one seed, e.g. (0, 1, 2)")

    @classmethod
    def quick(cls, **kw) -> "BenchSettings":
        return cls(**{"max_steps": 10, "train_size": 256, "test_size": 128, "latency_repeats": 5,
                      "seeds": (0,), "timing_rounds": 3, **kw})


def default_output() -> Path:
    from peftlab.data import data_dir

    return data_dir() / "results"


# --- one method, in its own process -----------------------------------------------------

def _setup(s: BenchSettings, seed: int):
    import torch

    import peftlab
    from peftlab import runtime
    from peftlab.data import stratified_subset

    if s.threads:
        torch.set_num_threads(s.threads)
    else:
        runtime.use_physical_cores()
    peftlab.seed_everything(seed)
    ds = peftlab.load_sentiment("rotten_tomatoes", seed=seed)
    train_ds, test_ds = ds["train"], ds["test"]
    if s.train_size:
        train_ds = stratified_subset(train_ds, s.train_size, seed)
    if s.test_size:
        test_ds = stratified_subset(test_ds, s.test_size, seed)
    return train_ds, test_ds


def measure(method: str, s: BenchSettings, seed: int) -> dict:
    """Train ``method`` with ``seed`` and measure it in this process (call it in a fresh one)."""
    import torch

    import peftlab
    from peftlab import metrics
    from peftlab.data import PadCollator, tokenize_classification
    from peftlab.methods import TRAIN_OPTIONS, MethodHParams, MethodUnavailable, prepare, save_trained
    from peftlab.train import TrainConfig, train

    train_ds, test_ds = _setup(s, seed)
    device = torch.device(s.device)
    rss0 = metrics.current_rss_bytes()
    model, tok = peftlab.load_model("minilm", task="classification", num_labels=2, seed=seed,
                                    device=device)
    train_tok = tokenize_classification(train_ds, tok, s.max_length)
    test_tok = tokenize_classification(test_ds, tok, s.max_length)
    total = sum(p.numel() for p in model.parameters())
    batch = PadCollator(tok)([test_tok[i] for i in range(min(s.latency_batch, len(test_tok)))])
    batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    amp = torch.bfloat16 if s.bf16 else None

    def forward(m):
        def call():
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                m(**batch)
        return call

    model.eval()
    base_latency = metrics.latency(forward(model), repeats=s.latency_repeats, warmup=2, device=device)
    hp = MethodHParams(r=s.r, alpha=s.alpha, prefix_length=s.prefix_length, bottleneck=s.bottleneck)
    try:
        model = prepare(model, method, hp)
    except MethodUnavailable as err:
        return {"method": method, "seed": seed, "available": False, "reason": str(err)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        gpu0 = torch.cuda.memory_allocated(device)
    cfg = TrainConfig(lr=s.lr[method], batch_size=s.batch_size, epochs=s.epochs, max_steps=s.max_steps,
                      warmup=WARMUP, schedule="linear", seed=seed, progress=False,
                      precision="bf16" if s.bf16 else "fp32", **TRAIN_OPTIONS.get(method, {}))
    result = train(model, train_tok, None, cfg)
    memory = (torch.cuda.max_memory_allocated(device) - gpu0 if device.type == "cuda"
              else metrics.peak_rss_bytes() - rss0)
    scores = metrics.evaluate_classifier(model, test_tok, autocast_dtype=amp)
    latency = metrics.latency(forward(model), repeats=s.latency_repeats, warmup=2, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        stored = save_trained(model, method, Path(tmp) / "out")
    return {"method": method, "seed": seed, "available": True, "trainable": trainable, "total": total,
            "percent": 100.0 * trainable / total, "accuracy": scores["accuracy"], "f1": scores["f1"],
            "roc_auc": scores["roc_auc"], "final_train_loss": result.history[-1]["loss"],
            "steps": result.steps, "train_seconds": result.train_seconds,
            "memory_bytes": int(memory), "latency_seconds": latency,
            "base_latency_seconds": base_latency, "latency_ratio": latency / base_latency,
            "stored_bytes": stored, "lr": cfg.lr}


def time_steps(methods: tuple[str, ...], s: BenchSettings) -> dict[str, dict[str, float]]:
    """Seconds of one training step of each method, interleaved in a balanced order.

    All models live in this one process and see the same real batch; each round times every
    method once in ``peftlab.bench.timing``'s balanced order (rotated, reversed every other
    round), so slow drifts of a shared machine hit all of them alike. CPU: process CPU time;
    CUDA: wall time with synchronisation. Returns median, min, quartiles and max per method.
    """
    import torch

    import peftlab
    from peftlab.data import PadCollator, tokenize_classification
    from peftlab.methods import MethodHParams, MethodUnavailable, prepare
    from peftlab.train import param_groups
    from peftlab.bench.timing import autocast, interleaved_times

    train_ds, _ = _setup(s, s.seeds[0])
    device = torch.device(s.device)
    hp = MethodHParams(r=s.r, alpha=s.alpha, prefix_length=s.prefix_length, bottleneck=s.bottleneck)
    steps, tok = {}, None
    for method in methods:
        model, tok = peftlab.load_model("minilm", task="classification", num_labels=2, seed=0, device=device)
        try:
            model = prepare(model, method, hp).train()
        except MethodUnavailable:
            continue
        optimizer = torch.optim.AdamW(param_groups(model, 0.01)[0], lr=1e-5)

        def step(model=model, optimizer=optimizer):
            with autocast(device.type, s.bf16):  # as train() runs it
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps[method] = step
    tokens = tokenize_classification(train_ds, tok, s.max_length)
    batch = PadCollator(tok)([tokens[i] for i in range(min(s.batch_size, len(tokens)))])
    batch = {k: v.to(device) for k, v in batch.items()}

    times = interleaved_times(steps, rounds=s.timing_rounds, warmup=2, device=device.type)
    return times["wall"] if device.type == "cuda" else times["cpu"]


# --- the whole table ----------------------------------------------------------------------

def _subprocess(args: list[str], what: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "peftlab.bench.table", *args, "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"bench of {what} failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(method: str, runs: list[dict]) -> dict:
    """One table row from the runs (one per seed) of ``method``."""
    if not runs[0]["available"]:
        return {"method": method, "label": LABELS[method], "available": False, "reason": runs[0]["reason"]}
    row = {"method": method, "label": LABELS[method], "available": True, "seeds": [r["seed"] for r in runs],
           "runs": runs}
    for key in ("accuracy", "f1", "roc_auc", "memory_bytes", "latency_ratio", "train_seconds"):
        row[key], row[key + "_std"] = _mean_std([r[key] for r in runs])
    for key in ("trainable", "total", "percent", "stored_bytes", "lr", "steps"):
        row[key] = runs[0][key]
    return row


def run_bench(settings: BenchSettings, methods: tuple[str, ...] | None = None,
              output: Path | None = None, log=print, command: str = "peftlab bench") -> dict:
    """Every (method, seed) in a fresh subprocess, then the step timing; write benchmark.md/.json."""
    from peftlab.methods import METHODS
    from peftlab.runtime import physical_cores

    methods = methods or METHODS
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    output = Path(output) if output else default_output()
    output.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    start = time.perf_counter()
    blob = json.dumps(asdict(settings))
    for seed in settings.seeds:
        for method in methods:
            t0 = time.perf_counter()
            run = _subprocess(["--child", method, "--seed", str(seed), "--settings", blob], f"{method!r}")
            runs[method].append(run)
            log(f"{method:>10} seed {seed}: {time.perf_counter() - t0:5.0f} s  "
                + (f"test acc {run['accuracy']:.3f}" if run["available"] else "not available yet"))
    rows = [summarise(m, runs[m]) for m in methods]
    t0 = time.perf_counter()
    timing = _subprocess(["--timing", ",".join(m for m in methods if runs[m][0]["available"]),
                          "--settings", blob], "the step timing")
    log(f"step timing: {time.perf_counter() - t0:.0f} s")
    full = next((r for r in rows if r["method"] == "full" and r["available"]), None)
    for r in rows:
        if r["available"]:
            r["step_seconds"] = timing[r["method"]]["median"]
            r["step_spread"] = [timing[r["method"]]["min"], timing[r["method"]]["max"]]
        if r["available"] and full:
            r["step_ratio"] = r["step_seconds"] / timing["full"]["median"]
            r["memory_ratio"] = r["memory_bytes"] / full["memory_bytes"]
    import torch

    data = {"command": command, "settings": asdict(settings), "seconds": time.perf_counter() - start,
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu_threads": settings.threads or physical_cores(), "cpus": os.cpu_count(),
                        "platform": platform.platform()},
            "timing": timing, "rows": rows}
    (output / "benchmark.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    (output / "benchmark.md").write_text(format_markdown(data), encoding="utf-8")
    return data


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def format_markdown(data: dict) -> str:
    """The table as Markdown, with the command and the budget underneath."""
    s = data["settings"]
    seeds = s["seeds"]
    pm = (lambda r, k: f"{r[k]:.3f} ± {r[k + '_std']:.3f}" if len(seeds) > 1 else f"{r[k]:.3f}")
    head = ("| method | trainable params | % of model | lr | test acc | test F1 | step time / full FT "
            "| peak train memory / full FT | inference latency / base | stored after training |")
    lines = [head, "|" + "---|" * 10]
    for r in data["rows"]:
        if not r["available"]:
            lines.append(f"| {r['label']} | not available yet | | | | | | | | |")
            continue
        ratio = (lambda k: f"{r[k]:.2f}" if k in r else "n/a")
        lines.append(f"| {r['label']} | {r['trainable']:,} | {r['percent']:.2f} % | {r['lr']:g} | {pm(r, 'accuracy')} "
                     f"| {pm(r, 'f1')} | {ratio('step_ratio')} | {ratio('memory_ratio')} "
                     f"| {r['latency_ratio']:.2f} | {_size(r['stored_bytes'])} |")
    budget = (f"{s['max_steps']} steps (cut short)" if s.get("max_steps") else f"{s['epochs']} epoch(s)")
    clock = "process CPU time" if s["device"] == "cpu" else "synchronised wall time"
    lines += ["", f"Made by `{data['command']}` in {data['seconds'] / 60:.1f} min "
              f"(device {s['device']}, bf16 {s['bf16']}, torch {data['machine']['torch']}, "
              f"{data['machine']['cpu_threads']} CPU thread(s) per process). Budget per method: {budget} "
              f"x batch {s['batch_size']}, max length {s['max_length']}, {WARMUP:.0%} warm-up then linear decay, "
              f"seeds {', '.join(map(str, seeds))} (mean ± sample std), "
              f"train size {s['train_size'] or 'all'}, test size {s['test_size'] or 'all (853)'}; "
              f"LoRA r={s['r']}, alpha={s['alpha']} on query/value; {s['prefix_length']} virtual tokens; "
              f"adapter bottleneck {s['bottleneck']}. Step time: median {clock} of one step on the same batch, "
              f"{s.get('timing_rounds', '?')} rounds in a balanced order, all methods in one process. Memory: "
              "peak RSS growth from just before the model load (CPU) or max_memory_allocated (CUDA), "
              "each run in a fresh process."]
    return "\n".join(lines) + "\n"


def _child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m peftlab.bench.table")
    parser.add_argument("--child")
    parser.add_argument("--timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    settings = BenchSettings(**json.loads(args.settings))
    if args.timing:
        found = time_steps(tuple(args.timing.split(",")), settings)
    else:
        found = measure(args.child, settings, args.seed)
    Path(args.out).write_text(json.dumps(found), encoding="utf-8")


def reference(path: Path | None = None) -> tuple[dict[str, dict], str]:
    """The course's stored table: rows by method, and the budget they were trained with, in words.

    Notebooks 01, 02, 04, 05 and 07–09 print these next to their own short live runs.
    """
    path = Path(path) if path else default_output() / "benchmark.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    s = data["settings"]
    seeds = s.get("seeds", [s.get("seed", 0)])
    budget = (f"{s['max_steps']} steps" if s.get("max_steps") else
              f"{s['steps']} steps" if s.get("steps") else
              "one full epoch" if s.get("epochs", 1) == 1 else f"{s['epochs']} epochs")
    spread = f"mean of {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    text = f"{budget} x batch {s['batch_size']}, test accuracy, {spread}"
    return {r["method"]: r for r in data["rows"]}, text


if __name__ == "__main__":
    _child(sys.argv[1:])
