"""The course's benchmark table: every method on MiniLM / Rotten Tomatoes with one budget.

``peftlab bench [--quick] [--device cuda] [--bf16]`` trains each method of
``peftlab.methods.METHODS`` with the same data, seed, batch size, maximum length and number
of optimizer steps, then writes ``data/results/benchmark.md`` and ``benchmark.json`` with, per
method: trainable parameters, % of the model, test accuracy and F1, train step time / full
fine-tuning step, peak training memory / full fine-tuning, inference latency / base model and
the size of what must be stored after training.

Every method runs in its own fresh Python process, one after the other in one invocation:
the process's peak resident memory (``ru_maxrss``) is a lifetime maximum, so only a fresh
process measures one method's training alone. Memory is the peak RSS growth from just
before the model is loaded (weights + gradients + optimizer state + activations) on the CPU,
``torch.cuda.max_memory_allocated`` on CUDA. Latency is the median of timed forward passes
of one test batch, the trained model against the same process's untouched base model.
Step times come from consecutive processes on the same machine, so a busy machine adds
noise; the JSON keeps the absolute numbers. Methods whose module is not installed get a row
that says "not available yet". Explained in ``notebooks/06_training.ipynb``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["BenchSettings", "run_bench", "format_markdown", "LABELS", "LEARNING_RATES"]

LABELS = {
    "head": "head only (frozen body)", "full": "full fine-tuning", "peft-lora": "HF peft LoRA",
    "lora": "peftlab LoRA", "prefix": "prefix-tuning", "prompt": "prompt tuning",
    "houlsby": "Houlsby adapters", "pfeiffer": "Pfeiffer adapters",
}
# one learning rate per method (the usual ranges; tune them with peftlab.search)
LEARNING_RATES = {"head": 2e-3, "full": 1e-4, "peft-lora": 2e-3, "lora": 2e-3, "prefix": 5e-3,
                  "prompt": 3e-2, "houlsby": 1e-3, "pfeiffer": 1e-3}


@dataclass
class BenchSettings:
    """The one budget every method gets."""

    steps: int = 150  # optimizer steps per method
    batch_size: int = 16  # examples per step
    max_length: int = 64  # tokens per sentence (Rotten Tomatoes sentences are ~25 tokens)
    train_size: int | None = None  # None: the whole training split
    test_size: int | None = None  # None: the whole test split (853 sentences)
    r: int = 8  # LoRA rank (query, value) for both LoRA rows
    alpha: float = 16
    prefix_length: int = 16  # virtual tokens for prefix and prompt tuning
    bottleneck: int = 32  # adapters
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    latency_batch: int = 32
    latency_repeats: int = 15
    threads: int | None = 1  # CPU threads per method; 1 keeps shared machines from thrashing

    @classmethod
    def quick(cls, **kw) -> "BenchSettings":
        return cls(**{"steps": 10, "train_size": 256, "test_size": 128, "latency_repeats": 5, **kw})


def default_output() -> Path:
    from peftlab.data import data_dir

    return data_dir() / "results"


# --- one method, in its own process -----------------------------------------------------

def measure(method: str, s: BenchSettings) -> dict:
    """Train and measure ``method`` in this process (call it in a fresh one)."""
    import torch

    import peftlab
    from peftlab import metrics
    from peftlab.data import PadCollator, stratified_subset, tokenize_classification
    from peftlab.methods import MethodHParams, MethodUnavailable, prepare, save_trained
    from peftlab.train import TrainConfig, train

    if s.threads:
        torch.set_num_threads(s.threads)
    peftlab.seed_everything(s.seed)
    device = torch.device(s.device)
    ds = peftlab.load_sentiment("rotten_tomatoes", seed=s.seed)
    train_ds, test_ds = ds["train"], ds["test"]
    if s.train_size:
        train_ds = stratified_subset(train_ds, s.train_size, s.seed)
    if s.test_size:
        test_ds = stratified_subset(test_ds, s.test_size, s.seed)
    rss0 = metrics.current_rss_bytes()
    model, tok = peftlab.load_model("minilm", task="classification", num_labels=2, seed=s.seed,
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
        return {"method": method, "available": False, "reason": str(err)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        gpu0 = torch.cuda.memory_allocated(device)
    cfg = TrainConfig(lr=LEARNING_RATES[method], batch_size=s.batch_size, max_steps=s.steps,
                      warmup=0.1, schedule="linear", seed=s.seed, progress=False,
                      precision="bf16" if s.bf16 else "fp32")
    result = train(model, train_tok, None, cfg)
    memory = (torch.cuda.max_memory_allocated(device) - gpu0 if device.type == "cuda"
              else metrics.peak_rss_bytes() - rss0)
    scores = metrics.evaluate_classifier(model, test_tok, batch_size=64, autocast_dtype=amp)
    latency = metrics.latency(forward(model), repeats=s.latency_repeats, warmup=2, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        stored = save_trained(model, method, Path(tmp) / "out")
    return {"method": method, "available": True, "trainable": trainable, "total": total,
            "percent": 100.0 * trainable / total, "accuracy": scores["accuracy"], "f1": scores["f1"],
            "roc_auc": scores["roc_auc"], "final_train_loss": result.history[-1]["loss"],
            "step_seconds": result.step_seconds, "train_seconds": result.train_seconds,
            "memory_bytes": int(memory), "latency_seconds": latency,
            "base_latency_seconds": base_latency, "latency_ratio": latency / base_latency,
            "stored_bytes": stored, "lr": cfg.lr}


# --- the whole table ----------------------------------------------------------------------

def run_bench(settings: BenchSettings, methods: tuple[str, ...] | None = None,
              output: Path | None = None, log=print, command: str = "peftlab bench") -> dict:
    """Run every method in a fresh subprocess; write benchmark.md/.json; return the JSON data."""
    from peftlab.methods import METHODS

    methods = methods or METHODS
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    output = Path(output) if output else default_output()
    output.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.perf_counter()
    for method in methods:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            cmd = [sys.executable, "-m", "peftlab.benchtable", "--child", method,
                   "--settings", json.dumps(asdict(settings)), "--row", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode != 0:
                raise RuntimeError(f"bench of {method!r} failed:\n{proc.stderr[-4000:]}")
            row = json.loads(out.read_text())
        row["label"] = LABELS[method]
        rows.append(row)
        log(f"{method:>10}: {time.perf_counter() - t0:5.0f} s  "
            + (f"acc {row['accuracy']:.3f}" if row["available"] else "not available yet"))
    full = next((r for r in rows if r["method"] == "full" and r["available"]), None)
    for r in rows:
        if r["available"] and full:
            r["step_ratio"] = r["step_seconds"] / full["step_seconds"]
            r["memory_ratio"] = r["memory_bytes"] / full["memory_bytes"]
    import torch

    data = {"command": command, "settings": asdict(settings), "seconds": time.perf_counter() - start,
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu_threads": settings.threads or torch.get_num_threads(),
                        "cpus": os.cpu_count(), "platform": platform.platform()},
            "rows": rows}
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
    head = ("| method | trainable params | % of model | test acc | test F1 | step time / full FT "
            "| peak train memory / full FT | inference latency / base | stored after training |")
    lines = [head, "|" + "---|" * 9]
    for r in data["rows"]:
        if not r["available"]:
            lines.append(f"| {r['label']} | not available yet | | | | | | | |")
            continue
        ratio = (lambda k: f"{r[k]:.2f}" if k in r else "n/a")
        lines.append(f"| {r['label']} | {r['trainable']:,} | {r['percent']:.2f} % | {r['accuracy']:.3f} "
                     f"| {r['f1']:.3f} | {ratio('step_ratio')} | {ratio('memory_ratio')} "
                     f"| {r['latency_ratio']:.2f} | {_size(r['stored_bytes'])} |")
    lines += ["", f"Made by `{data['command']}` in {data['seconds'] / 60:.1f} min "
              f"(device {s['device']}, bf16 {s['bf16']}, torch {data['machine']['torch']}, "
              f"{data['machine']['cpu_threads']} CPU thread(s) per method). Budget per method: {s['steps']} steps "
              f"x batch {s['batch_size']}, max length {s['max_length']}, seed {s['seed']}, "
              f"train size {s['train_size'] or 'all'}, test size {s['test_size'] or 'all (853)'}; "
              f"LoRA r={s['r']}, alpha={s['alpha']} on query/value; {s['prefix_length']} virtual tokens. "
              "Memory: peak RSS growth from just before the model load (CPU) or "
              "max_memory_allocated (CUDA), each method in a fresh process."]
    return "\n".join(lines) + "\n"


def _child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m peftlab.benchtable")
    parser.add_argument("--child", required=True)
    parser.add_argument("--settings", required=True)
    parser.add_argument("--row", required=True)
    args = parser.parse_args(argv)
    row = measure(args.child, BenchSettings(**json.loads(args.settings)))
    Path(args.row).write_text(json.dumps(row), encoding="utf-8")


if __name__ == "__main__":
    _child(sys.argv[1:])
