"""Checkers for the exercises of notebooks/11_serving_many_adapters.ipynb (serving many adapters).

Same contract as ``peftlab.exercises``: each checker runs the student's answer, compares it with a
float64 (or exact integer) reference computed here, prints ``right`` / ``wrong`` with a hint that
names the symptom, and returns a :class:`peftlab.exercises.Verdict`.  Worked solutions and typical
wrong answers are in ``tests/test_serving.py``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .exercises import PENDING_VALUE, Verdict, _report, _run_answer, _tensor_verdict
from .serving import BASE

__all__ = ["check_routed_lora", "check_serving_memory", "MEMORY_QUESTION", "BASE"]


# -- exercise 1: one linear layer serving a mixed batch --------------------------------------
def _reference(x, W, b, adapters, names) -> torch.Tensor:
    out = x @ W.T + b  # (n, ..., out)
    for i, n in enumerate(names):
        if n != BASE:
            A, B, s = adapters[n]
            out[i] = out[i] + s * (x[i] @ A.T @ B.T)
    return out


def check_routed_lora(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(x, W, b, adapters, names)`` must return the mixed-batch output of one LoRA linear layer.

    x: (n, ..., in); W: (out, in); b: (out,); adapters: name -> (A (r, in), B (out, r), scale);
    names: n adapter names, one per row, :data:`peftlab.serving.BASE` for the base layer alone.
    Row i must be ``x_i W^T + b + scale * x_i A^T B^T`` of its own adapter.  Checked on 2-D and
    3-D inputs, several ranks, BASE rows and a batch that uses only some of the adapters.
    """
    g = torch.Generator().manual_seed(0)
    cases = [((6,), 5, 4, {"p": 2, "q": 3}, ["p", BASE, "q", "q", "p", BASE]),
             ((4, 3), 6, 7, {"p": 1, "q": 4, "u": 2}, ["u", "p", BASE, "p"]),
             ((3,), 4, 4, {"p": 2, "q": 2}, ["q", "q", "q"])]
    for lead, d_in, d_out, ranks, names in cases:
        x = torch.randn(*lead, d_in, generator=g, dtype=torch.float64)
        W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
        b = torch.randn(d_out, generator=g, dtype=torch.float64)
        adapters = {n: (torch.randn(r, d_in, generator=g, dtype=torch.float64),
                        torch.randn(d_out, r, generator=g, dtype=torch.float64), 0.5 + j)
                    for j, (n, r) in enumerate(ranks.items())}
        want = _reference(x, W, b, adapters, names)
        copies = {n: (A.clone(), B.clone(), s) for n, (A, B, s) in adapters.items()}
        got, problem = _run_answer(fn, x.clone(), W.clone(), b.clone(), copies, list(names),
                                   where=f"for x {tuple(x.shape)} and names {names}")
        if problem is None:
            problem = _tensor_verdict(got, want.shape, f"for x of shape {tuple(x.shape)} the output must be")
        if problem is not None:
            return _report(problem, quiet)
        got = got.double()
        if torch.allclose(got, want, atol=1e-8, rtol=1e-6):
            continue
        base = x @ W.T + b
        bad = [i for i in range(len(names)) if not torch.allclose(got[i], want[i], atol=1e-8, rtol=1e-6)]
        i = bad[0]
        if names[i] == BASE:
            msg = f"row {i} is named BASE, so it must get the base layer's output alone (no adapter branch)"
        elif torch.allclose(got[i], base[i], atol=1e-8):
            msg = f"row {i} (adapter {names[i]!r}) got the base output alone: its adapter's branch is missing"
        elif any(torch.allclose(got[i], _reference(x, W, b, adapters, [m] * len(names))[i], atol=1e-8)
                 for m in adapters if m != names[i]):
            msg = f"row {i} got another adapter's branch than its own {names[i]!r}: pick (A, B, scale) by names[i]"
        else:
            A, B, s = adapters[names[i]]
            branch = x[i] @ A.T @ B.T
            if torch.allclose(got[i], base[i] + branch, atol=1e-8):
                msg = f"row {i}: the branch is not multiplied by its adapter's scale ({s})"
            elif torch.allclose(got[i], x[i] @ W.T + s * branch, atol=1e-8):
                msg = f"row {i}: the bias b is missing"
            else:
                msg = f"row {i} (adapter {names[i]!r}) differs from x_i W^T + b + scale * x_i A^T B^T"
        return _report(Verdict(False, msg), quiet)
    return _report(Verdict(True, "every row matches its own adapter (and BASE rows the base layer) on every case"),
                   quiet)


# -- exercise 2: the memory of k merged copies vs one base and k adapters --------------------
# SmolLM2-135M (fp32): its parameter count, 30 decoder layers of hidden size 576, and q_proj
# (576 -> 576) / v_proj (576 -> 192, 3 key-value heads of 64); 16 adapters of rank 8 on q and v.
MEMORY_QUESTION = {"base_parameters": 134_515_008, "layers": 30, "hidden": 576, "v_out": 192, "r": 8, "k": 16,
                   "bytes_per_parameter": 4}


def _memory_answers(q: dict) -> tuple[int, int, int]:
    per_layer = q["r"] * (q["hidden"] + q["hidden"]) + q["r"] * (q["hidden"] + q["v_out"])  # A and B of q, of v
    adapter = q["layers"] * per_layer * q["bytes_per_parameter"]
    base = q["base_parameters"] * q["bytes_per_parameter"]
    return q["k"] * base, base + q["k"] * adapter, adapter


def check_serving_memory(copies_bytes, shared_bytes, quiet: bool = False) -> Verdict:
    """``copies_bytes``: bytes of k merged model copies; ``shared_bytes``: bytes of one base model plus
    k adapters, for :data:`MEMORY_QUESTION` (parameters only, exact integers)."""
    copies, shared, adapter = _memory_answers(MEMORY_QUESTION)
    q = MEMORY_QUESTION
    for label, got, want in (("copies_bytes", copies_bytes, copies), ("shared_bytes", shared_bytes, shared)):
        if got is None:
            return _report(Verdict(False, PENDING_VALUE, pending=True), quiet)
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            return _report(Verdict(False, f"{label} must be a number of bytes, got {type(got).__name__}"), quiet)
        if got == want:
            continue
        if got * q["bytes_per_parameter"] == want:
            hint = "that is a count of parameters: each float32 parameter takes 4 bytes"
        elif label == "copies_bytes" and got == copies // q["k"]:
            hint = "that is one copy: a merged copy per adapter means k copies of the whole model"
        elif label == "shared_bytes" and got == shared - q["base_parameters"] * q["bytes_per_parameter"]:
            hint = "that is the adapters alone: the one shared base model is part of the memory too"
        elif label == "shared_bytes" and got == q["base_parameters"] * q["bytes_per_parameter"] + adapter:
            hint = "that is one adapter: the question has k of them"
        elif label == "shared_bytes":
            hint = ("count A (r x in) and B (out x r) of both q_proj (576 -> 576) and v_proj (576 -> 192) "
                    "in every layer")
        else:
            hint = "k copies of the base model's parameters, at 4 bytes each"
        return _report(Verdict(False, f"{label} = {got:,} is not right; {hint}"), quiet)
    return _report(Verdict(True, f"{copies:,} bytes for the copies vs {shared:,} shared: "
                                 f"{copies / shared:.1f}x less memory with one base"), quiet)
