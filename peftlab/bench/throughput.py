"""Throughput and serving-latency measurements for every method, side by side in one run.

Two benchmarks, each printing ratios measured in the same process with interleaved rounds
(so that drift on a busy machine hits every variant alike) and medians:

* ``prefix``: SmolLM2-135M prefix-tuning (Li & Liang, 2021) training tokens/s and cached
  generation tokens/s, next to LoRA training and base-model generation on the same model.
* ``serve``: MiniLM classification latency of the frozen base vs merged LoRA, unmerged LoRA,
  bottleneck adapters (Houlsby, Pfeiffer, parallel), prefix- and prompt tuning: the
  deployment trade-off of ``notebooks/09_deployment.ipynb``.

``python -m peftlab.bench.throughput prefix|serve [--device cuda] [--bf16] [--random-init]``.
``--random-init`` builds the same architectures with random weights (same shapes, same
FLOPs) for machines that do not have the embedded model packages, such as a lent GPU box.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from peftlab import inject, merge
from peftlab.bench.lora import MINILM_SHAPE
from peftlab.bench.timing import autocast, interleaved_times, train_step
from peftlab.config import AdapterConfig, LoRAConfig, PrefixConfig, PromptTuningConfig

# SmolLM2-135M-Instruct's architecture, for --random-init
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2)


def _model(name: str, task: str, device: str, random_init: bool, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    if not random_init:
        from peftlab import load_model

        model, _ = load_model(name, task=task, seed=seed)
    elif name == "smollm2":
        cfg = transformers.LlamaConfig(**SMOLLM2_SHAPE, attn_implementation="eager")
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.BertConfig(**MINILM_SHAPE, attn_implementation="eager")  # 2 labels
        model = transformers.BertForSequenceClassification(cfg)
    return model.to(device).eval()


def _interleaved(fns: dict[str, Callable[[], None]], device: str, warmup: int,
                 rounds: int) -> dict[str, float]:
    """Median wall seconds per call of each function, in ``peftlab.bench.timing``'s balanced order."""
    times = interleaved_times(fns, rounds=rounds, warmup=warmup, device=torch.device(device).type)
    return {k: v["median"] for k, v in times["wall"].items()}


def bench_prefix(device: str = "cpu", bf16: bool = False, random_init: bool = False,
                 batch: int = 8, seq: int = 128, new_tokens: int = 32, rounds: int = 5) -> dict:
    """Prefix-tuning vs LoRA training tokens/s, and prefixed vs base generation tokens/s."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SMOLLM2_SHAPE["vocab_size"], (batch, seq), generator=gen).to(device)
    train_batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    prompt = {"input_ids": ids[:, :32], "attention_mask": torch.ones_like(ids[:, :32])}

    prefixed = _model("smollm2", "causal-lm", device, random_init)
    inject(prefixed, PrefixConfig(num_virtual_tokens=16, projection=True), name="prefix")
    lora = _model("smollm2", "causal-lm", device, random_init)
    inject(lora, LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")), name="lora")
    base = _model("smollm2", "causal-lm", device, random_init)

    def generator(model) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), autocast(device, bf16):
                model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, use_cache=True, pad_token_id=2)
        return run

    for m in (prefixed, lora):
        m.train()
    train = _interleaved({"prefix": train_step(prefixed, train_batch, device, bf16),
                          "lora": train_step(lora, train_batch, device, bf16)},
                         device, warmup=1, rounds=rounds)
    for m in (prefixed, lora):
        m.eval()
    merge(prefixed)  # serving uses the folded, flat prefix
    gen_t = _interleaved({"prefix": generator(prefixed), "base": generator(base)},
                         device, warmup=1, rounds=max(2, rounds // 2))
    tokens = batch * seq
    return {
        "device": device, "bf16": bf16, "random_init": random_init,
        "train_tokens_per_s": {k: tokens / v for k, v in train.items()},
        "generate_tokens_per_s": {k: batch * new_tokens / v for k, v in gen_t.items()},
        "prefix_train_step_over_lora": train["prefix"] / train["lora"],
        "prefix_generate_time_over_base": gen_t["prefix"] / gen_t["base"],
        "settings": {"batch": batch, "seq": seq, "new_tokens": new_tokens, "m": 16},
    }


SERVE_VARIANTS: dict[str, Callable[[], object] | None] = {
    "base": None,
    "lora unmerged": lambda: LoRAConfig(r=8, alpha=16, modules_to_save=("classifier",)),
    "lora merged": lambda: LoRAConfig(r=8, alpha=16, modules_to_save=("classifier",)),
    "houlsby (b=32)": lambda: AdapterConfig(bottleneck=32, placement="houlsby"),
    "pfeiffer (b=32)": lambda: AdapterConfig(bottleneck=32, placement="pfeiffer"),
    "parallel (b=32)": lambda: AdapterConfig(bottleneck=32, placement="parallel"),
    "prefix (m=16)": lambda: PrefixConfig(num_virtual_tokens=16, projection=False),
    "prompt (m=16)": lambda: PromptTuningConfig(num_virtual_tokens=16),
}


def bench_serve(device: str = "cpu", bf16: bool = False, random_init: bool = False,
                batch: int = 16, seq: int = 64, rounds: int = 15) -> dict:
    """Inference latency of each method on MiniLM relative to the frozen base model."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, MINILM_SHAPE["vocab_size"], (batch, seq), generator=gen).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    fns = {}
    for name, make in SERVE_VARIANTS.items():
        model = _model("minilm", "classification", device, random_init)
        if make is not None:
            inject(model, make(), name="task")
        if name == "lora merged":
            merge(model)

        def run(model=model) -> None:
            with torch.no_grad(), autocast(device, bf16):
                model(**inputs)

        fns[name] = run
    seconds = _interleaved(fns, device, warmup=2, rounds=rounds)
    return {"device": device, "bf16": bf16, "random_init": random_init,
            "batch": batch, "seq": seq,
            "ms": {k: 1000 * v for k, v in seconds.items()},
            "over_base": {k: v / seconds["base"] for k, v in seconds.items()}}


def format_serve(result: dict) -> str:
    lines = [f"MiniLM inference, batch {result['batch']} x {result['seq']}, {result['device']}"
             f"{' bf16' if result['bf16'] else ''}{' (random init)' if result['random_init'] else ''}",
             "| variant | median ms | latency / base |", "|---|---|---|"]
    for k, ms in result["ms"].items():
        lines.append(f"| {k} | {ms:.2f} | {result['over_base'][k]:.3f} |")
    return "\n".join(lines)


def format_prefix(result: dict) -> str:
    t, g = result["train_tokens_per_s"], result["generate_tokens_per_s"]
    s = result["settings"]
    return "\n".join([
        f"SmolLM2-135M, batch {s['batch']} x {s['seq']}, m={s['m']}, {result['device']}"
        f"{' bf16' if result['bf16'] else ''}{' (random init)' if result['random_init'] else ''}",
        "| measure | prefix | other | ratio |", "|---|---|---|---|",
        f"| training tokens/s (other: LoRA r=8 q,v) | {t['prefix']:.0f} | {t['lora']:.0f} | "
        f"step time {result['prefix_train_step_over_lora']:.3f} |",
        f"| cached greedy generation tokens/s (other: base) | {g['prefix']:.0f} | {g['base']:.0f} | "
        f"time {result['prefix_generate_time_over_base']:.3f} |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftlab.bench.throughput", description=__doc__.split("\n")[0])
    parser.add_argument("which", choices=("prefix", "serve"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    parser.add_argument("--random-init", action="store_true", help="real shapes, random weights")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if args.which == "prefix":
        result = bench_prefix(args.device, args.bf16, args.random_init)
        print(format_prefix(result))
    else:
        result = bench_serve(args.device, args.bf16, args.random_init)
        print(format_serve(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
