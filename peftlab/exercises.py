"""Checkers for the notebooks' exercises: the student writes code, the checker runs it.

Each checker calls the student's function on several random shapes and edge cases, compares
with a float64 reference computed here, and prints ``right`` or ``wrong`` with a hint that
names the symptom (never the answer). It returns True or False, so a notebook cell can also
``assert`` it. The tests (``tests/test_exercises.py``) hold worked solutions, which must pass,
and the typical wrong answers, which must fail.
"""

from __future__ import annotations

import traceback
from typing import Callable

import torch
from torch import nn

__all__ = ["check_lora_forward", "check_replace_linears", "Verdict"]


class Verdict:
    """What a checker found: ``ok`` and a one-line message (printed by the checkers)."""

    def __init__(self, ok: bool, message: str) -> None:
        self.ok, self.message = ok, message

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return ("right: " if self.ok else "wrong: ") + self.message


def _report(verdict: Verdict, quiet: bool) -> Verdict:
    if not quiet:
        print(verdict)
    return verdict


def _crash(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1]
    return f"it raised {type(exc).__name__}: {exc} (line {last.lineno})"


# -- a LoRA forward in the paper's convention ---------------------------------------------------
def check_lora_forward(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(x, W, b, A, B, alpha)`` must return the LoRA layer's output
    x W^T + b + (alpha / r) x A^T B^T, with W (out, in), b (out,), A (r, in), B (out, r),
    for x of shape (..., in). Checked on non-square layers, ranks 1..8 and 1-, 2- and 3-D inputs.
    """
    g = torch.Generator().manual_seed(0)
    cases = [((5,), 7, 3, 2, 16.0), ((2, 4), 6, 10, 8, 8.0), ((3, 1, 5), 5, 4, 1, 1.0), ((4,), 9, 9, 4, 32.0)]
    for lead, d_in, d_out, r, alpha in cases:
        x = torch.randn(*lead, d_in, generator=g, dtype=torch.float64)
        W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
        b = torch.randn(d_out, generator=g, dtype=torch.float64)
        A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
        B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
        want = x @ W.T + b + (alpha / r) * (x @ A.T @ B.T)
        try:
            got = fn(x.clone(), W.clone(), b.clone(), A.clone(), B.clone(), alpha)
        except Exception as exc:  # the student's code: any error is a finding, not a crash of the checker
            hint = (" -- check which factor meets x first: A is (r, in), so x A^T is (..., r)"
                    if "shape" in str(exc) or "size" in str(exc) else "")
            return _report(Verdict(False, _crash(exc) + hint), quiet)
        if not torch.is_tensor(got) or tuple(got.shape) != tuple(want.shape):
            shape = tuple(got.shape) if torch.is_tensor(got) else type(got).__name__
            return _report(Verdict(False, f"for x of shape {tuple(x.shape)} and a {d_in} -> {d_out} layer the "
                                          f"output must be {tuple(want.shape)}, got {shape}"), quiet)
        if torch.allclose(got.double(), want, atol=1e-8, rtol=1e-6):
            continue
        base = x @ W.T + b
        branch = x @ A.T @ B.T
        if torch.allclose(got.double(), base, atol=1e-8):
            msg = "the output is the base layer's alone: the low-rank branch is missing"
        elif torch.allclose(got.double(), base + branch, atol=1e-8) and alpha != r:
            msg = f"the branch is not scaled: with alpha={alpha} and r={r} it must be multiplied by alpha / r"
        elif torch.allclose(got.double(), base + alpha * r * branch, atol=1e-6) or torch.allclose(
                got.double(), base + (r / alpha) * branch, atol=1e-8):
            msg = "the scale is inverted: it is alpha divided by r"
        elif torch.allclose(got.double(), x @ W.T + (alpha / r) * branch, atol=1e-8):
            msg = "the bias b is missing"
        else:
            msg = f"the values differ from the LoRA formula for x {tuple(x.shape)}, r={r}, alpha={alpha}"
        return _report(Verdict(False, msg), quiet)
    return _report(Verdict(True, "matches x W^T + b + (alpha/r) x A^T B^T on every shape tried"), quiet)


# -- replacing layers through their parent ------------------------------------------------------
class _Marked(nn.Module):
    """What the checker's ``make`` returns: the layer, plus a constant so the change is visible."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x) + 0.5


def _tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def check_replace_linears(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(model, make)`` must replace every ``nn.Linear`` inside ``model.bert.encoder`` by
    ``make(layer)``, in place, and leave the pooler and the classifier alone."""
    model = _tiny_bert()
    x = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        before = model(input_ids=x).logits
    expected = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.encoder.")]
    try:
        fn(model, _Marked)
    except Exception as exc:
        hint = (" -- the loop adds modules while named_modules() is still walking them: collect the names "
                "first (list(...)), then replace" if "changed size during iteration" in str(exc) else "")
        return _report(Verdict(False, _crash(exc) + hint), quiet)
    stray = [f"{p or 'model'}.{c}" for p, m in model.named_modules() for c in m._modules if "." in c]
    if stray:
        return _report(Verdict(False, f"{len(stray)} modules now have a child whose name contains dots "
                                      f"(e.g. {stray[0]!r}): setattr on the root adds an attribute, it does not "
                                      "reach the layer; set it on the layer's parent"), quiet)
    missed = [n for n in expected if not isinstance(model.get_submodule(n), _Marked)]
    if missed:
        return _report(Verdict(False, f"{len(missed)} of {len(expected)} encoder linear layers were not replaced "
                                      f"(e.g. {missed[0]!r})"), quiet)
    for keep in ("bert.pooler.dense", "classifier"):
        if not isinstance(model.get_submodule(keep), nn.Linear):
            return _report(Verdict(False, f"{keep!r} was replaced too: only the encoder's layers should be"), quiet)
    doubled = [n for n, m in model.named_modules() if isinstance(m, _Marked) and isinstance(m.layer, _Marked)]
    if doubled:
        return _report(Verdict(False, f"{doubled[0]!r} was wrapped twice: walk a list of the original layers"),
                       quiet)
    with torch.no_grad():
        after = model(input_ids=x).logits
    if torch.equal(after, before):
        return _report(Verdict(False, "the model computes the same as before: the new layers are never called"),
                       quiet)
    return _report(Verdict(True, f"all {len(expected)} encoder linear layers replaced through their parents, "
                                 "pooler and classifier untouched"), quiet)
