"""Table-to-text reference runs: ``python -m peftlab.bench e2e [--seeds 0,1,2] [--quick]``.

Prefix-tuning (Li & Liang 2021) and LoRA (Hu et al. 2021) on the embedded SmolLM2-135M,
trained on E2E NLG (Novikova et al. 2017) with the same budget: ``steps`` optimizer steps of
``batch`` table/sentence pairs (loss on the sentence only, ``data.tokenize_e2e``), linear decay
after a 10 % warm-up, each method at its own learning rate. Each (method, seed) runs in a fresh
process (``python -m peftlab.bench.e2e _child METHOD SEED QUICK``, which prints one JSON line).
Scored on the first ``tables`` held-out test tables (every human reference of a table counts):
greedy decoding with the KV cache, first line of the output, corpus BLEU and ROUGE-L
(``peftlab.metrics``). The untouched base model is scored the same way once.

Three seeds per method (mean ± sample std) show whether the budget is long enough for a stable
number (each seed draws other training pairs, in another order, and another initialisation).
The reference run (``REFERENCE_METHODS``, issue 15) adds prompt tuning started from the same words'
embeddings and a prefix started from N(0, 1) (the start notebook 04 shows failing); every run
stores its training curve (``losses``, one per step), the summary the mean curve; the random start
(``ONE_SEED_ONLY``) is trained on the last seed only. ``--reuse PATH`` takes over the runs of an
earlier result with the same budget, method and seed (``reusable``). Writes
``data/results/e2e.json`` and ``e2e.md``. Shown in ``notebooks/04_prefix_tuning.ipynb`` next to its
short live run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["E2E_METHODS", "bench_e2e", "format_e2e", "reference"]

PREFIX_INIT = "text:Write one sentence describing the restaurant."
# method -> (what is trained, learning rate); LoRA's rate is the one the classification table
# uses, prefix-tuning's the one notebook 04 uses through its MLP
E2E_METHODS = {
    "prefix": ("prefix-tuning, 10 virtual tokens, MLP 128, text init", 5e-3),
    # what peftlab's prefix-tuning did before issue 15 (and what many write first): flat prefixes drawn
    # from N(0, 1), which at step 0 swamp attention and multiply the loss (notebook 04, "Where the prefix
    # starts matters"); kept as the reference's bad start, at the flat prefix's usual rate
    "prefix-random": ("prefix-tuning, 10 virtual tokens, flat, N(0, 1) init", 1e-2),
    # the same 10 virtual tokens as input embeddings (Lester et al. 2021), started from the embeddings of
    # the same words; prompt tuning wants a high rate (only 10 x 576 numbers move)
    "prompt": ("prompt tuning, 10 virtual tokens, text init", 3e-2),
    "lora": ("LoRA r=8, alpha=16 on q_proj and v_proj", 2e-3),
    # QLoRA (Dettmers et al. 2023): the same LoRA on a base whose linear layers are NF4 4-bit
    "qlora": ("QLoRA: the same LoRA over the NF4 4-bit base", 2e-3),
}
REFERENCE_METHODS = ("prefix", "prefix-random", "prompt", "lora")  # the stored reference run (notebook 04)
# trained on one seed, the last: the random start is shown failing (its curve and BLEU next to the other
# methods' runs of that seed: the same pairs in the same order), not ranked
ONE_SEED_ONLY = ("prefix-random",)
BUDGET = {"steps": 100, "batch": 8, "tables": 60, "new_tokens": 40, "warmup": 0.1}
QUICK_BUDGET = {"steps": 2, "batch": 2, "tables": 4, "new_tokens": 8, "warmup": 0.1}


def _config(method: str):
    from peftlab.config import LoRAConfig, PrefixConfig, PromptTuningConfig

    if method == "prefix":
        return PrefixConfig(num_virtual_tokens=10, projection=True, projection_hidden=128, init=PREFIX_INIT)
    if method == "prefix-random":
        return PrefixConfig(num_virtual_tokens=10, projection=False, init="random")
    if method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=10, init=PREFIX_INIT)
    if method in ("lora", "qlora"):
        return LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"))
    raise ValueError(f"unknown E2E method {method!r}: choose from {sorted(E2E_METHODS)}")


def _score(model, tokenizer, test, budget: dict) -> dict:
    from peftlab import data, metrics

    tables, references = data.group_references(test)
    tables, references = tables[:budget["tables"]], references[:budget["tables"]]
    prompts = [data.e2e_prompt(t) for t in tables]
    start = time.perf_counter()
    texts = metrics.generate_texts(model, tokenizer, prompts, max_new_tokens=budget["new_tokens"])
    hyps = [t.split("\n")[0].strip() for t in texts]
    return {"bleu": metrics.bleu(hyps, references), "rouge_l": metrics.rouge_l(hyps, references),
            "generate_s": time.perf_counter() - start, "examples": hyps[:3], "tables": len(tables)}


def run_one(method: str, seed: int, budget: dict) -> dict:
    """Train ``method`` (or score the base model, ``method="base"``) in this process."""
    import gc

    import peftlab
    from peftlab import data, metrics
    from peftlab.inject import count_parameters, inject, merge
    from peftlab.train import TrainConfig, train

    peftlab.runtime.use_physical_cores()
    peftlab.seed_everything(seed)
    rss_start = metrics.current_rss_bytes()  # the runtime alone: torch, transformers, no model yet
    model, tok = peftlab.load_model("smollm2", task="causal-lm", quantize="nf4" if method == "qlora" else None)
    e2e = peftlab.load_e2e(seed=seed)
    if method == "base":
        return {"method": "base", "seed": seed, **_score(model, tok, e2e["test"], budget)}
    inject(model, _config(method), "e2e")
    trainable = count_parameters(model).trainable
    n = budget["steps"] * budget["batch"]
    pairs = data.tokenize_e2e(e2e["train"].shuffle(seed=seed).select(range(n)), tok)
    config = TrainConfig(lr=E2E_METHODS[method][1], batch_size=budget["batch"], max_steps=budget["steps"],
                         warmup=budget["warmup"], metric="loss", seed=seed, progress=False)
    gc.collect()
    metrics.trim_heap()  # freed fp32 weights (QLoRA's quantization) go back to the OS before the peak is reset
    peak_reset = metrics.reset_peak_rss()  # from here the peak is the training's own
    result = train(model, pairs, config=config)
    train_peak = metrics.peak_rss_bytes() - rss_start if peak_reset else None
    model.eval()
    # LoRA folds into the weights, the prefix MLP into a flat prefix; a 4-bit base keeps LoRA beside it
    # (merging would round the update away), and a flat prefix or a soft prompt has nothing to fold
    if method in ("lora", "prefix"):
        merge(model)
    return {"method": method, "seed": seed, "trainable": trainable, "lr": config.lr, "steps": result.steps,
            "train_peak_mb": None if train_peak is None else train_peak / 1e6,
            "step_s": result.train_seconds / max(result.steps, 1),
            "pairs": n, "train_pairs_total": len(e2e["train"]), "train_s": result.train_seconds,
            "loss_first": result.history[0]["loss"], "loss_last": result.history[-1]["loss"],
            "losses": [round(h["loss"], 4) for h in result.history],  # the training curve, one loss per step
            **_score(model, tok, e2e["test"], budget)}


def _child(method: str, seed: int, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "peftlab.bench.e2e", "_child", method, str(seed), "1" if quick else "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"the E2E {method} run (seed {seed}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def reusable(previous: dict | None, budget: dict) -> dict[tuple[str, int], dict]:
    """The runs of an earlier result that this run may take over: same budget, method label and rate.

    Every run is seeded and decodes greedily, so the same (method, seed, budget) gives the same BLEU
    (LoRA seed 0 re-run in another session: 62.244 both times); only its timing belongs to the
    earlier machine state. Each taken-over run keeps the note ``"reused": True``.
    """
    if not previous or any(previous["settings"].get(k) != v for k, v in budget.items()):
        return {}
    found = {("base", previous["base"]["seed"]): previous["base"]}
    for method, rs in previous["runs"].items():
        if method in E2E_METHODS and previous["summary"][method]["label"] == E2E_METHODS[method][0] \
                and previous["summary"][method]["lr"] == E2E_METHODS[method][1]:
            found.update({(method, r["seed"]): r for r in rs})
    return found


def bench_e2e(seeds: tuple[int, ...] = (0, 1, 2), methods: tuple[str, ...] = REFERENCE_METHODS,
              quick: bool = False, log=print, reuse: dict | None = None) -> dict:
    """Score the base model once, then train and score every (method, seed) in its own process.

    ``reuse``: an earlier result (the JSON this function returns); its runs with the same budget,
    method and seed are taken over instead of trained again (``reusable``).
    """
    bad = [m for m in methods if m not in E2E_METHODS]
    if bad or not methods:
        raise ValueError(f"methods={methods!r}: choose from {sorted(E2E_METHODS)}")
    if not seeds:
        raise ValueError("seeds must name at least one seed, e.g. (0, 1, 2)")
    budget = QUICK_BUDGET if quick else BUDGET
    start = time.perf_counter()
    earlier = reusable(reuse, budget)

    def run(method: str, seed: int) -> dict:
        if (method, seed) in earlier:
            log(f"{method}, seed {seed}: taken over from the earlier result")
            return {**earlier[method, seed], "reused": True}
        log(f"training {method}, seed {seed} ..." if method != "base" else "scoring the base model ...")
        return _child(method, seed, quick)

    base = run("base", seeds[0])
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:
        for method in methods:
            if method in ONE_SEED_ONLY and seed != seeds[-1]:
                continue
            runs[method].append(run(method, seed))
            r = runs[method][-1]
            log(f"  {method} seed {seed}: BLEU {r['bleu']:.1f}, ROUGE-L {r['rouge_l']:.3f}, "
                f"loss {r['loss_first']:.2f} -> {r['loss_last']:.2f}, {r['train_s']:.0f} s")
    summary = {}
    for method, rs in runs.items():
        bleus, rouges = [r["bleu"] for r in rs], [r["rouge_l"] for r in rs]
        summary[method] = {"label": E2E_METHODS[method][0], "lr": E2E_METHODS[method][1],
                           "seeds": [r["seed"] for r in rs], "trainable": rs[0]["trainable"],
                           "bleu_mean": statistics.fmean(bleus),
                           "bleu_std": statistics.stdev(bleus) if len(bleus) > 1 else 0.0,  # sample std
                           "bleu_spread": max(bleus) - min(bleus), "bleu": bleus,
                           "rouge_l_mean": statistics.fmean(rouges),
                           "rouge_l_std": statistics.stdev(rouges) if len(rouges) > 1 else 0.0,
                           "loss_last_mean": statistics.fmean(r["loss_last"] for r in rs),
                           # the mean training curve over the seeds (each seed's loss at each step)
                           # (runs taken over from a result older than the curves have none)
                           "losses_mean": [statistics.fmean(v) for v in
                                           zip(*(r["losses"] for r in rs if "losses" in r))],
                           "curve_seeds": [r["seed"] for r in rs if "losses" in r],
                           # the median, so that one run slowed by other jobs on the machine does not move it
                           "train_s_median": statistics.median(r["train_s"] for r in rs),
                           "train_peak_mb": max((r.get("train_peak_mb") or 0.0) for r in rs) or None}
    return {"settings": {**budget, "seeds": list(seeds), "quick": quick, "model": "SmolLM2-135M-Instruct (fp32; qlora: NF4 linear layers)",
                         "peak_mb": "process peak RSS during training minus the RSS before the model was loaded"},
            "base": base, "runs": runs, "summary": summary, "wall_s": time.perf_counter() - start}


def format_e2e(result: dict) -> str:
    s = result["settings"]
    lines = [f"E2E NLG on SmolLM2-135M: {s['steps']} steps x {s['batch']} pairs per method and seed, "
             f"BLEU / ROUGE-L on {s['tables']} held-out test tables (seeds {s['seeds']})", "",
             "| method | trainable | lr | BLEU per seed | BLEU mean ± std | ROUGE-L mean ± std | final loss "
             "| train s (median) | peak MB |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| base model (no training) | 0 | - | {result['base']['bleu']:.1f} | {result['base']['bleu']:.1f} "
             f"| {result['base']['rouge_l']:.3f} | - | - | - |"]
    for m in result["summary"].values():
        per_seed = " / ".join(f"{b:.1f}" for b in m["bleu"])
        peak = f"{m['train_peak_mb']:.0f}" if m.get("train_peak_mb") else "-"
        one = len(m["bleu"]) == 1  # a single seed has no spread to show
        lines.append(f"| {m['label']} | {m['trainable']:,} | {m['lr']:g} | {per_seed} "
                     + (f"| {m['bleu_mean']:.1f} (one seed) | {m['rouge_l_mean']:.3f} " if one else
                        f"| {m['bleu_mean']:.1f} ± {m.get('bleu_std', 0.0):.1f} "
                        f"| {m['rouge_l_mean']:.3f} ± {m.get('rouge_l_std', 0.0):.3f} ")
                     + f"| {m['loss_last_mean']:.2f} | {m['train_s_median']:.0f} | {peak} |")
    summary = result["summary"]
    if "prefix" in summary and "lora" in summary:
        gap = summary["lora"]["bleu_mean"] - summary["prefix"]["bleu_mean"]
        lines += ["", f"LoRA minus prefix-tuning (text init) at the same budget: {gap:+.1f} BLEU "
                      "(means over the seeds)"]
    if "lora" in summary and "qlora" in summary and summary["lora"].get("train_peak_mb"):
        lo, q = summary["lora"], summary["qlora"]
        lines += ["", f"QLoRA / LoRA, measured side by side in this run: peak training memory above the runtime "
                      f"{q['train_peak_mb'] / lo['train_peak_mb']:.2f}x, training time "
                      f"{q['train_s_median'] / lo['train_s_median']:.2f}x, BLEU {q['bleu_mean'] - lo['bleu_mean']:+.1f}"]
    runs = [r for rs in result["runs"].values() for r in rs] + [result["base"]]
    taken = sum(bool(r.get("reused")) for r in runs)
    reused = f" ({taken} runs taken over from an earlier result, see `reused` in the JSON)" if taken else ""
    lines += ["", f"whole run {result['wall_s'] / 60:.1f} min{reused}; settings: {s}"]
    return "\n".join(lines)


def default_path() -> Path:
    from peftlab.data import data_dir

    return data_dir() / "results" / "e2e.json"


def reference(path: Path | None = None) -> dict:
    """The stored E2E reference result (``python -m peftlab.bench e2e``) as a dict."""
    path = Path(path) if path else default_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: make it with `python -m peftlab.bench e2e`")
    return json.loads(path.read_text())


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "_child":
    method, seed, quick = sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    budget = QUICK_BUDGET if quick else BUDGET
    print(json.dumps(run_one(method, seed, budget)))
