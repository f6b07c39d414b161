"""Serving k LoRA adapters at once: one mixed batch vs separate runs vs k merged model copies.

``python -m peftlab.bench mixed [--quick] [--json PATH]``. For k = 1, 4, 16 adapters (LoRA r=8 on
the attention q/v projections, random non-zero B) and a batch of N rows spread evenly over them
(row i -> adapter i mod k), three ways of serving the same rows are timed in the same process, in
interleaved rounds (``peftlab.bench.timing``), median wall time after a warm-up:

* ``mixed``: one forward / ``generate()`` of the whole batch, rows routed per adapter
  (``peftlab.serving.adapter_rows``): the base layers run once for all N rows;
* ``separate``: for each adapter, ``peftlab.set_active`` and a run on its N / k rows only;
* ``merged``: k deep copies of the model, copy j with adapter j folded in (``peftlab.unload``),
  each run on its own rows.

Two workloads: MiniLM sequence classification (one forward of N x T tokens) and SmolLM2-135M
greedy generation with the KV cache (N short prompts, a fixed number of new tokens).  Memory is
the bytes of parameters and buffers (shared tensors counted once, ``peftlab.serving.model_bytes``)
of the base model, of the model carrying the k adapters (it must exceed the base by exactly the
adapters' own bytes: both numbers are printed and compared) and of the k merged copies, plus
the process's peak RSS.

What to expect, honestly: an encoder forward over long rows is compute-bound, and the base
matmuls are the same FLOPs whether the N rows go in one batch or in k pieces, so a mixed batch
may give about 1x there (a little more at large k, where small batches use the cores worse and
pay per-call overhead k times).  Greedy decoding of a small batch is bound by reading the weights
and by per-step overhead: a mixed batch reads them once per step for all N rows, separate runs k
times, so there it wins by up to ~k.  The merged copies cost k times the model's memory for the
same speed as separate runs.  The table shows what this machine measures.  Explained in
notebooks/11_serving_many_adapters.ipynb.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from peftlab.bench.timing import interleaved_times
from peftlab.config import LoRAConfig
from peftlab.inject import inject, set_active, unload
from peftlab.metrics import peak_rss_bytes
from peftlab.runtime import physical_cores
from peftlab.serving import adapter_bytes, adapter_rows, model_bytes

__all__ = ["bench_mixed", "measure", "add_adapters", "format_mixed", "default_path", "FULL", "QUICK"]

# per workload: rows N, tokens per row (classification: sequence length; generation: prompt
# length), new tokens (generation only), ks, timed rounds.  Sized so the full run takes about
# 2 minutes on a 2-core laptop CPU (estimated from timed parts of it; most of it is k = 16 separate /
# merged generation: 16 runs of one row each, per way and round).  The 16 merged SmolLM2 copies
# take about 8 GiB of RAM.
FULL = {"classify": dict(rows=32, seq=64, ks=(1, 4, 16), rounds=4),
        "generate": dict(rows=16, seq=8, new_tokens=8, ks=(1, 4, 16), rounds=3)}
QUICK = {"classify": dict(rows=8, seq=16, ks=(1, 4), rounds=2),
         "generate": dict(rows=4, seq=4, new_tokens=4, ks=(1, 4), rounds=1)}


def default_path() -> Path:
    """Where the full run writes its JSON (and the table beside it as .md)."""
    from peftlab.data import data_dir

    return data_dir() / "results" / "mixed.json"


def add_adapters(model: nn.Module, k: int, targets: tuple[str, ...], r: int = 8, std: float = 0.05,
                 seed: int = 0) -> list[str]:
    """Inject adapters ``a0 .. a{k-1}`` (LoRA r, alpha 2r, on ``targets``), each with its own random
    non-zero B (normal, ``std``), so that every adapter changes the outputs; returns their names."""
    g = torch.Generator().manual_seed(seed)
    names = [f"a{j}" for j in range(k)]
    for n in names:
        inject(model, LoRAConfig(r=r, alpha=2 * r, target_modules=targets), name=n)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".lora_B." in pname:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    set_active(model, None)
    return names


def _rows(inputs: dict, idx: list[int]) -> dict:
    pick = torch.tensor(idx)
    return {k: v.index_select(0, pick) for k, v in inputs.items()}


def measure(make_model: Callable[[], nn.Module], inputs: dict, ks: tuple[int, ...], targets: tuple[str, ...],
            rounds: int = 3, warmup: int = 0, new_tokens: int = 0, pad_token_id: int = 0,
            with_merged: bool = True) -> list[dict]:
    """Time and size the three ways of serving ``inputs``' rows over k adapters, for each k in ``ks``.

    ``make_model()`` returns a fresh base model in eval mode; ``new_tokens`` = 0 times a forward
    (classification), > 0 a greedy ``generate()`` with the KV cache and exactly that many new
    tokens.  Returns one dict per k: rows/s and seconds of each way, the ratios, the byte counts,
    and how far the mixed outputs are from the separate and the merged ones (max abs logit
    difference, or the number of rows whose generated tokens differ).  The first call of each way
    (for those outputs) is the warm-up; ``warmup`` adds more.  ``with_merged=False`` leaves out the
    k merged copies (k times the model's memory), e.g. in a notebook.
    """
    n = next(iter(inputs.values())).shape[0]
    results = []
    for k in ks:
        model = make_model()
        base_bytes = model_bytes(model)
        names = add_adapters(model, k, targets, seed=k)
        row_names = [names[i % k] for i in range(n)]
        groups = {a: [i for i in range(n) if row_names[i] == a] for a in names}
        parts = {a: _rows(inputs, idx) for a, idx in groups.items()}
        merged = {a: unload(copy.deepcopy(model), name=a) for a in names} if with_merged else {}

        def run(m: nn.Module, batch: dict):
            if new_tokens:
                return m.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  use_cache=True, pad_token_id=pad_token_id)
            return m(**batch).logits

        def mixed():
            with adapter_rows(model, row_names):
                return run(model, inputs)

        def separate():
            out = {}
            for a in names:
                set_active(model, a)
                out[a] = run(model, parts[a])
            set_active(model, None)
            return out

        def merged_copies():
            return {a: run(merged[a], parts[a]) for a in names}

        with torch.inference_mode():
            ways = {"mixed": mixed, "separate": separate, **({"merged": merged_copies} if with_merged else {})}
            first = {w: fn() for w, fn in ways.items()}  # also the first (warm-up) calls
            times = interleaved_times(ways, rounds=rounds, warmup=warmup)["wall"]
        got = first.pop("mixed")
        agreement = {}
        for way, other in first.items():
            if new_tokens:  # rows whose generated tokens are not the same
                agreement[f"rows_differing_from_{way}"] = sum(
                    not torch.equal(got[i], other[a][j]) for a, idx in groups.items() for j, i in enumerate(idx))
            else:
                agreement[f"max_abs_diff_vs_{way}"] = max(
                    float((got[idx] - other[a]).abs().max()) for a, idx in groups.items())
        seconds = {w: t["median"] for w, t in times.items()}
        own = sum(adapter_bytes(model, a) for a in names)
        mixed_bytes = model_bytes(model)
        results.append({
            "k": k, "rows": n, "seconds": seconds, "rows_per_s": {w: n / s for w, s in seconds.items()},
            "mixed_over_separate": seconds["separate"] / seconds["mixed"],
            "mixed_over_merged": seconds["merged"] / seconds["mixed"] if with_merged else None,
            "bytes": {"base": base_bytes, "mixed": mixed_bytes, "growth": mixed_bytes - base_bytes,
                      "adapters": own, "growth_equals_adapters": mixed_bytes - base_bytes == own,
                      "merged_copies": model_bytes(*merged.values()) if with_merged else None},
            **agreement,
        })
        del model, merged
    return results


def _classify_setup(quick: bool):
    from peftlab.hub import load_model

    s = (QUICK if quick else FULL)["classify"]
    model, tok = load_model("minilm", task="classification", num_labels=2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, tok.vocab_size, (s["rows"], s["seq"]), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    make = lambda: load_model("minilm", task="classification", num_labels=2)[0]  # noqa: E731
    del model
    return make, inputs, s, ("query", "value"), 0


def _generate_setup(quick: bool):
    from peftlab.hub import load_model

    s = (QUICK if quick else FULL)["generate"]
    _, tok = load_model("smollm2", task="causal-lm")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (s["rows"], s["seq"]), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    make = lambda: load_model("smollm2", task="causal-lm")[0]  # noqa: E731
    return make, inputs, s, ("q_proj", "v_proj"), tok.pad_token_id


def bench_mixed(quick: bool = False) -> dict:
    """Both workloads (MiniLM classification, SmolLM2 greedy generation), every k; see the module docstring."""
    threads = torch.get_num_threads()
    torch.set_num_threads(physical_cores())
    try:
        out = {"quick": quick, "threads": torch.get_num_threads(), "torch": torch.__version__, "workloads": {}}
        for kind, setup in (("classify", _classify_setup), ("generate", _generate_setup)):
            make, inputs, s, targets, pad = setup(quick)
            cases = measure(make, inputs, s["ks"], targets, rounds=s["rounds"], new_tokens=s.get("new_tokens", 0),
                            pad_token_id=pad)
            out["workloads"][kind] = {"model": "minilm" if kind == "classify" else "smollm2",
                                      "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
                                      "targets": list(targets), "cases": cases, "peak_rss_mb": peak_rss_bytes() / 2**20}
        return out
    finally:
        torch.set_num_threads(threads)


def format_mixed(result: dict) -> str:
    """The markdown table of :func:`bench_mixed`'s result."""
    mb = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    lines = [f"Mixed-adapter serving, {result['threads']} threads{' (quick)' if result['quick'] else ''}", "",
             "| workload | k | rows/s mixed | rows/s separate | rows/s merged | mixed / separate | mixed / merged "
             "| MiB base | MiB mixed | growth = adapters? | MiB k merged copies |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, w in result["workloads"].items():
        s = w["settings"]
        label = (f"{w['model']} forward, {s['rows']} x {s['seq']} tokens" if kind == "classify" else
                 f"{w['model']} generate, {s['rows']} rows, {s['new_tokens']} new tokens")
        for c in w["cases"]:
            r, b = c["rows_per_s"], c["bytes"]
            same = "yes" if b["growth_equals_adapters"] else f"NO ({b['growth']:,} vs {b['adapters']:,} bytes)"
            merged = "-" if c["mixed_over_merged"] is None else f"{r['merged']:.1f}"
            ratio = "-" if c["mixed_over_merged"] is None else f"{c['mixed_over_merged']:.2f}x"
            copies = "-" if b["merged_copies"] is None else mb(b["merged_copies"])
            lines.append(f"| {label} | {c['k']} | {r['mixed']:.1f} | {r['separate']:.1f} | {merged} | "
                         f"{c['mixed_over_separate']:.2f}x | {ratio} | {mb(b['base'])} | "
                         f"{mb(b['mixed'])} (+{b['growth']:,} B) | {same} | {copies} |")
    rss = ", ".join(f"{k}: {w['peak_rss_mb']:,.0f} MB" for k, w in result["workloads"].items())
    lines += ["", f"peak RSS of the process after each workload: {rss}"]
    return "\n".join(lines)


def main(quick: bool, path: Path | None) -> int:
    """The ``mixed`` mode of ``python -m peftlab.bench``: print the table, write JSON (+ .md) if asked,
    and by default for the full run."""
    result = bench_mixed(quick=quick)
    table = format_mixed(result)
    print(table)
    out = path or (None if quick else default_path())
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(table + "\n")
    return 0
