"""The ``peftlab`` command line: ``peftlab train ...`` and ``peftlab bench ...``.

    peftlab train --method lora --model minilm --data rotten_tomatoes --r 8 --alpha 16 \\
                  --epochs 1 --output-dir runs/lora
    peftlab bench [--quick] [--device cuda --bf16]    # writes data/results/benchmark.md/.json
    peftlab bench lora [--device cuda]                # LoRA micro-benchmark (peftlab.bench.lora)

``train`` fine-tunes one method (``peftlab.methods``) with ``peftlab.train``, evaluates on the
test split and writes ``<output-dir>/adapter/`` (what to keep), ``metrics.json`` and, with
``--checkpoint-every``, resumable checkpoints. ``bench`` hands over to the ``peftlab.bench``
package (``peftlab.bench.table``, ``peftlab.bench.cli``). Explained in
``notebooks/07_training.ipynb``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from peftlab.methods import METHODS

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text} (e.g. 1e-3 for LoRA, 5e-5 for full)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description="peftlab: train and benchmark "
                                     "parameter-efficient fine-tuning methods")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune one method on a sentiment dataset")
    t.add_argument("--method", required=True, choices=METHODS)
    t.add_argument("--model", default="minilm", help="minilm, smollm2, a folder or a Hub id")
    t.add_argument("--data", default="rotten_tomatoes", choices=("rotten_tomatoes", "imdb"))
    t.add_argument("--output-dir", required=True, help="where the adapter, metrics and checkpoints go")
    g = t.add_argument_group("method hyper-parameters")
    g.add_argument("--r", type=_positive_int, default=8, help="LoRA rank")
    g.add_argument("--alpha", type=_positive_float, default=16.0, help="LoRA alpha")
    g.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    g.add_argument("--target-modules", default="query,value", help="LoRA targets, comma-separated")
    g.add_argument("--prefix-length", type=_positive_int, default=16, help="prefix/prompt tokens")
    g.add_argument("--bottleneck", type=_positive_int, default=32, help="adapter bottleneck width")
    o = t.add_argument_group("training")
    o.add_argument("--lr", type=_positive_float, default=None,
                   help="default: the method's rate in peftlab.methods.LEARNING_RATES")
    o.add_argument("--head-lr", type=_positive_float, default=None,
                   help="the head's own rate (modules_to_save copies); default: the method's in "
                        "peftlab.methods.TRAIN_OPTIONS, else --lr")
    o.add_argument("--loraplus-ratio", type=_positive_float, default=None,
                   help="LoRA+: lora_B at lr * ratio; default: the method's in peftlab.methods.TRAIN_OPTIONS")
    o.add_argument("--batch-size", type=_positive_int, default=16)
    o.add_argument("--epochs", type=_positive_int, default=1)
    o.add_argument("--max-steps", type=_positive_int, default=None)
    o.add_argument("--max-length", type=_positive_int, default=64)
    o.add_argument("--train-size", type=_positive_int, default=None, help="stratified subset of train")
    o.add_argument("--warmup", type=float, default=0.06, help="share of steps (<1) or steps (>=1)")
    o.add_argument("--schedule", default="linear", choices=("linear", "cosine", "constant"))
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--grad-accum", type=_positive_int, default=1)
    o.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    o.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--checkpoint-every", type=_positive_int, default=None)
    o.add_argument("--resume", default=None, help="checkpoint folder or earlier output dir")
    o.add_argument("--tensorboard", action="store_true")
    o.add_argument("--no-progress", action="store_true")

    b = sub.add_parser("bench", help="the benchmark table (or `bench lora`: LoRA micro-benchmark)")
    b.add_argument("which", nargs="?", default="table", choices=("table", "lora"))
    b.add_argument("--quick", action="store_true", help="a ~3-minute smoke run of the table")
    b.add_argument("--device", default="cpu")
    b.add_argument("--bf16", action="store_true")
    b.add_argument("--steps", type=_positive_int, default=None,
                   help="cut every run short at this many optimizer steps (default: one full epoch)")
    b.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    b.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads per process (default: one per physical core)")
    b.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    b.add_argument("--output", default=None, help="folder for benchmark.md/.json (default data/results)")
    return parser


def _train(args, parser) -> dict:
    import peftlab
    from peftlab import metrics, runtime
    from peftlab.data import stratified_subset, tokenize_classification
    from peftlab.methods import LEARNING_RATES, TRAIN_OPTIONS, MethodHParams, prepare, save_trained
    from peftlab.train import TrainConfig, train

    warmup = int(args.warmup) if args.warmup >= 1 else float(args.warmup)
    device = str(runtime.get_device(args.device))
    config = TrainConfig(lr=args.lr or LEARNING_RATES[args.method], batch_size=args.batch_size,
                         epochs=args.epochs, max_steps=args.max_steps, warmup=warmup,
                         schedule=args.schedule, weight_decay=args.weight_decay,
                         grad_accum=args.grad_accum, precision=args.precision, seed=args.seed,
                         output_dir=args.output_dir, checkpoint_every=args.checkpoint_every,
                         log_tensorboard=args.tensorboard, progress=not args.no_progress,
                         device=device, **{**TRAIN_OPTIONS.get(args.method, {}), **{
                             k: v for k, v in (("head_lr", args.head_lr), ("loraplus_ratio", args.loraplus_ratio))
                             if v is not None}})
    runtime.seed_everything(args.seed)
    ds = peftlab.load_sentiment(args.data, seed=args.seed)
    if args.train_size:
        ds["train"] = stratified_subset(ds["train"], args.train_size, args.seed)
    model, tok = peftlab.load_model(args.model, task="classification", num_labels=2, seed=args.seed)
    tokens = tokenize_classification(ds, tok, args.max_length)
    hp = MethodHParams(r=args.r, alpha=args.alpha, dropout=args.dropout,
                       target_modules=tuple(t for t in args.target_modules.split(",") if t),
                       prefix_length=args.prefix_length, bottleneck=args.bottleneck)
    model = prepare(model, args.method, hp)
    start = time.perf_counter()
    result = train(model, tokens["train"], tokens["validation"], config, resume_from=args.resume)
    test = metrics.evaluate_classifier(model, tokens["test"], autocast_dtype=None)
    out = Path(args.output_dir)
    stored = save_trained(model, args.method, out / "adapter")
    summary = {"method": args.method, "model": args.model, "data": args.data,
               "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "test": test, "validation": result.final, "steps": result.steps,
               "seconds": time.perf_counter() - start, "step_seconds": result.step_seconds,
               "stored_bytes": stored, "config": vars(args)}
    (out / "metrics.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    print(f"{args.method}: test accuracy {test['accuracy']:.4f}, F1 {test['f1']:.4f} "
          f"after {result.steps} steps; saved {stored:,} bytes to {out / 'adapter'}")
    return summary


def _bench(args, parser, argv) -> int:
    if args.which == "lora":
        from peftlab.bench.cli import main as bench_main

        rest = ["lora", "--device", args.device] + (["--bf16"] if args.bf16 else [])
        return bench_main(rest) or 0
    from peftlab.bench.table import BenchSettings, format_markdown, run_bench

    kw = {"device": args.device, "bf16": args.bf16, "threads": args.threads}
    if args.steps:
        kw["max_steps"] = args.steps
    if args.seeds:
        try:
            kw["seeds"] = tuple(int(x) for x in args.seeds.split(",") if x.strip())
        except ValueError:
            parser.error(f"--seeds must be comma-separated integers such as 0,1,2, got {args.seeds!r}")
    settings = BenchSettings.quick(**kw) if args.quick else BenchSettings(**kw)
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else None
    bad = [m for m in methods or () if m not in METHODS]
    if bad:
        parser.error(f"--methods: unknown method(s) {bad}; choose from {','.join(METHODS)}")
    data = run_bench(settings, methods, Path(args.output) if args.output else None,
                     command="peftlab " + " ".join(argv))
    print(format_markdown(data))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench" and args.which == "lora" and (args.quick or args.steps or args.methods):
        parser.error("--quick/--steps/--methods apply to the table, not to `peftlab bench lora`")
    try:
        if args.command == "train":
            _train(args, parser)
            return 0
        return _bench(args, parser, argv)
    except (ValueError, KeyError, FileNotFoundError) as err:
        parser.exit(2, f"peftlab: error: {err}\n")
    except RuntimeError as err:
        parser.exit(1, f"peftlab: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
