"""Training-loop speed: ``python -m peftlab.bench speed [--json PATH] [--quick]``.

One epoch of LoRA (Hu et al. 2021; r=8, alpha=16 on query/value, the fresh head trained in
full) on MiniLM / Rotten Tomatoes at batch 32, run twice side by side in one invocation:

* ``peftlab``: ``peftlab.inject`` + ``peftlab.train`` (batches grouped by length, dynamic
  padding, evaluation under ``torch.inference_mode`` in length-sorted batches of 128);
* ``hf``: HF ``peft.get_peft_model`` + HF ``Trainer`` with its defaults and
  ``DataCollatorWithPadding`` (random batches padded to their longest sentence).

Both get the same tokenised data (max length 64), learning rate, batch size, epoch count,
warm-up steps, linear decay, weight decay and gradient clipping, and both then score the
whole test split. Each runs in a fresh process (so neither inherits the other's allocator or
thread state); the wall time and process CPU time of training and of test evaluation are
reported, with test accuracy. ``--rounds 2`` runs the order A B B A and reports the mean.
Each run is ``python -m peftlab.bench.speed _child VARIANT QUICK SEED`` (prints one JSON line).
Explained in ``notebooks/07_training.ipynb``, section "Why the loop is fast".
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

LR, BATCH, LENGTH, RANK, ALPHA, WARMUP = 2e-3, 32, 64, 8, 16, 0.06
WEIGHT_DECAY, CLIP = 0.0, 1.0  # HF Trainer's defaults, used by both sides
VARIANTS = ("peftlab", "hf")


def _data(quick: bool, seed: int):
    import peftlab
    from peftlab.data import stratified_subset, tokenize_classification

    rotten = peftlab.load_sentiment("rotten_tomatoes", seed=seed)
    model, tok = peftlab.load_model("minilm", task="classification", num_labels=2, seed=seed)
    train_set, test_set = rotten["train"], rotten["test"]
    if quick:
        train_set, test_set = stratified_subset(train_set, 256, seed), stratified_subset(test_set, 128, seed)
    return model, tok, tokenize_classification(train_set, tok, LENGTH), tokenize_classification(test_set, tok, LENGTH)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def run_peftlab(quick: bool = False, seed: int = 0) -> dict:
    import peftlab
    from peftlab.metrics import evaluate
    from peftlab.train import TrainConfig, train, warmup_steps

    model, _, train_tok, test_tok = _data(quick, seed)
    peftlab.inject(model, peftlab.LoRAConfig(r=RANK, alpha=ALPHA, target_modules=("query", "value"),
                                             modules_to_save=("classifier",)))
    steps = -(-len(train_tok) // BATCH)
    config = TrainConfig(lr=LR, batch_size=BATCH, epochs=1, warmup=warmup_steps(WARMUP, steps),
                         weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP, seed=seed, progress=False)
    wall, cpu = time.perf_counter(), _cpu()
    result = train(model, train_tok, None, config)
    train_wall, train_cpu = time.perf_counter() - wall, _cpu() - cpu
    wall, cpu = time.perf_counter(), _cpu()
    scores = evaluate(model, test_tok)
    return {"train_s": train_wall, "train_cpu_s": train_cpu, "eval_s": time.perf_counter() - wall,
            "eval_cpu_s": _cpu() - cpu, "accuracy": scores["accuracy"], "f1": scores["f1"],
            "steps": result.steps}


def run_hf(quick: bool = False, seed: int = 0) -> dict:
    import tempfile

    import peft
    import transformers
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from peftlab.metrics import classification_metrics
    from peftlab.train import warmup_steps

    transformers.logging.set_verbosity_error()
    model, tok, train_tok, test_tok = _data(quick, seed)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=RANK, lora_alpha=ALPHA,
                                                       target_modules=["query", "value"]))
    steps = -(-len(train_tok) // BATCH)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH,
                                 per_device_eval_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
                                 warmup_steps=warmup_steps(WARMUP, steps), lr_scheduler_type="linear",
                                 weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP, seed=seed,
                                 save_strategy="no", report_to="none", use_cpu=True,
                                 disable_tqdm=True, logging_strategy="no", dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=train_tok,
                          data_collator=DataCollatorWithPadding(tok))
        wall, cpu = time.perf_counter(), _cpu()
        out_train = trainer.train()
        train_wall, train_cpu = time.perf_counter() - wall, _cpu() - cpu
        wall, cpu = time.perf_counter(), _cpu()
        pred = trainer.predict(test_tok)
        eval_wall, eval_cpu = time.perf_counter() - wall, _cpu() - cpu
    scores = classification_metrics(pred.label_ids, pred.predictions)
    return {"train_s": train_wall, "train_cpu_s": train_cpu, "eval_s": eval_wall, "eval_cpu_s": eval_cpu,
            "accuracy": scores["accuracy"], "f1": scores["f1"], "steps": out_train.global_step}


def _child(variant: str, quick: bool, seed: int) -> dict:
    cmd = [sys.executable, "-m", "peftlab.bench.speed", "_child", variant, "1" if quick else "0", str(seed)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"the {variant} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_speed(quick: bool = False, rounds: int = 1, seed: int = 0, log=print) -> dict:
    """Run both variants in fresh processes (order A B, B A, ... for ``rounds``) and compare."""
    from peftlab.runtime import use_physical_cores

    order = []
    for r in range(rounds):
        order += list(VARIANTS if r % 2 == 0 else reversed(VARIANTS))
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for variant in order:
        log(f"running {variant} ...")
        runs[variant].append(_child(variant, quick, seed))
        log(f"  {variant}: " + ", ".join(f"{k} {v:.3f}" for k, v in runs[variant][-1].items()
                                          if isinstance(v, float)))
    mean = {v: {k: statistics.fmean(r[k] for r in rs) for k in ("train_s", "train_cpu_s", "eval_s",
                                                                  "eval_cpu_s", "accuracy", "f1")}
            for v, rs in runs.items()}
    total = {v: m["train_s"] + m["eval_s"] for v, m in mean.items()}
    ratio = total["peftlab"] / total["hf"]
    return {"settings": {"lr": LR, "batch": BATCH, "max_length": LENGTH, "r": RANK, "alpha": ALPHA,
                         "warmup": WARMUP, "weight_decay": WEIGHT_DECAY, "max_grad_norm": CLIP,
                         "epochs": 1, "quick": quick, "rounds": rounds, "seed": seed,
                         "threads": use_physical_cores()},
            "runs": runs, "mean": mean, "time_ratio": ratio,
            "train_time_ratio": mean["peftlab"]["train_s"] / mean["hf"]["train_s"],
            "targets": {"time_ratio <= 0.6": ratio <= 0.6,
                        "peftlab accuracy >= 0.83": mean["peftlab"]["accuracy"] >= 0.83}}


def format_speed(result: dict) -> str:
    m = result["mean"]
    lines = ["| loop | train wall s | train CPU s | test eval wall s | test accuracy | test F1 |",
             "|---|---|---|---|---|---|"]
    names = {"peftlab": "peftlab.train (length-grouped)", "hf": "HF Trainer + peft (defaults)"}
    for v in VARIANTS:
        lines.append(f"| {names[v]} | {m[v]['train_s']:.1f} | {m[v]['train_cpu_s']:.1f} | {m[v]['eval_s']:.1f} "
                     f"| {m[v]['accuracy']:.3f} | {m[v]['f1']:.3f} |")
    t = result["targets"]
    lines += ["", f"time (train + test eval) peftlab / HF: {result['time_ratio']:.3f} "
                  f"({'PASS' if t['time_ratio <= 0.6'] else 'MISS'} vs <= 0.6); training only "
                  f"{result['train_time_ratio']:.3f}",
              f"peftlab test accuracy {m['peftlab']['accuracy']:.3f} "
              f"({'PASS' if t['peftlab accuracy >= 0.83'] else 'MISS'} vs >= 0.83)",
              f"settings: {result['settings']}"]
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "_child":
    variant, quick, seed = sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    from peftlab.runtime import use_physical_cores

    use_physical_cores()
    fn = run_peftlab if variant == "peftlab" else run_hf
    print(json.dumps(fn(quick, seed)))
