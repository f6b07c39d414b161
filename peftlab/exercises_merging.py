"""Checkers for the exercises of notebooks/12_adapter_arithmetic.ipynb (merging adapters).

Same contract as ``peftlab.exercises``: the checker calls the student's function on several cases,
compares with a reference (``peftlab.merging`` or a float64 construction with a known answer), prints
``right`` or ``wrong`` with a hint naming the symptom, and returns a :class:`peftlab.exercises.Verdict`.
The tests (``tests/test_arithmetic.py``) hold a worked solution, which must pass, and the typical
wrong answers, which must fail.
"""

from __future__ import annotations

from typing import Callable

import torch

from .exercises import Verdict, _report, _run_answer, _tensor_verdict
from .merging import disjoint_mean, elect_sign

__all__ = ["check_ties_combine", "check_merge_rank"]


def _ties_reference(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    w = weights.view(-1, *([1] * (stacked.dim() - 1)))  # (n,) -> (n, 1, ..., 1)
    return disjoint_mean(stacked * w, elect_sign(stacked, "total"))


def check_ties_combine(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(tau, w)`` must do TIES's last two steps on already-trimmed task vectors ``tau`` (n, *S)
    with weights ``w`` (n,): elect per entry the sign of sum_i tau_i (a sum of 0 elects +), then
    return, per entry, the mean of w_i tau_i over the i whose tau_i has the elected sign (0 where
    none has): a tensor of shape S.  Checked against ``peftlab.merging`` (float64, n = 2 to 4,
    1-D to 3-D, negative weights, zeros from trimming)."""
    g = torch.Generator().manual_seed(12)
    cases = [((6,), [1.0, 1.0]), ((4, 5), [0.5, 2.0, 1.0]), ((3, 2, 4), [1.0, -0.7]), ((7, 3), [0.3, 0.3, 1.2, 2.0])]
    for shape, ws in cases:
        tau = torch.randn(len(ws), *shape, generator=g, dtype=torch.float64)
        tau = tau * (torch.rand(tau.shape, generator=g, dtype=torch.float64) > 0.3)  # trimmed: some zeros
        w = torch.tensor(ws, dtype=torch.float64)
        want = _ties_reference(tau, w)
        where = f"for {len(ws)} task vectors of shape {shape} and weights {ws}"
        got, problem = _run_answer(fn, tau.clone(), w.clone(), where=where)
        if problem is not None:
            return _report(problem, quiet)
        problem = _tensor_verdict(got, shape, f"{where} the merged tensor must have shape")
        if problem is not None:
            return _report(problem, quiet)
        got = got.double()
        if torch.allclose(got, want, atol=1e-9):
            continue
        wt = tau * w.view(-1, *([1] * len(shape)))
        agree_w = elect_sign(wt, "total")
        if torch.allclose(got, wt.sum(0), atol=1e-9):
            msg = "that is the plain weighted sum: elect a sign per entry and drop the values that disagree"
        elif torch.allclose(got, (wt * elect_sign(tau)).sum(0), atol=1e-9):
            msg = "you summed the agreeing values: TIES takes their mean (divide by how many agree)"
        elif torch.allclose(got, (wt * elect_sign(tau)).sum(0) / len(ws), atol=1e-9):
            msg = "you divided by the number of task vectors: divide by the number that agree at that entry"
        elif torch.allclose(got, disjoint_mean(wt, agree_w), atol=1e-9):
            msg = f"with weights {ws} the sign must be elected on the unweighted tau, before weighting"
        elif torch.allclose(got, (wt * elect_sign(tau)).sum(0) / (tau != 0).sum(0).clamp(min=1), atol=1e-9):
            msg = "you counted every non-zero value: count only those with the elected sign"
        else:
            msg = f"{where} the values differ from sign election + disjoint mean"
        return _report(Verdict(False, msg), quiet)
    return _report(Verdict(True, "elects the signs and averages the agreeing values like peftlab.merging.ties"),
                   quiet)


def _rank_cases() -> list[tuple[str, list, list, list, int]]:
    """(what, As, Bs, weights, rank of sum_i w_i B_i A_i), built so that the rank is known."""
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    a1, b1, a2, b2 = rnd(4, 20), rnd(24, 4), rnd(4, 20), rnd(24, 4)
    a3, b3 = rnd(8, 10), rnd(12, 8)
    return [
        ("two generic rank-4 adapters", [a1, a2], [b1, b2], [1.0, 0.5], 8),
        ("a weight of 0", [a1, a2], [b1, b2], [1.0, 0.0], 4),
        ("two adapters sharing A (the same input directions)", [a1, a1], [b1, b2], [1.0, 1.0], 4),
        ("two adapters that cancel (B_2 = -B_1, A_2 = A_1)", [a1, a1], [b1, -b1], [1.0, 1.0], 0),
        ("two rank-8 adapters on a 10 -> 12 layer", [a3, rnd(8, 10)], [b3, rnd(12, 8)], [1.0, 1.0], 10),
        ("three generic adapters of ranks 4, 4 and 2",
         [a1, a2, rnd(2, 20)], [b1, b2, rnd(24, 2)], [1.0, -1.0, 2.0], 10),
    ]


def check_merge_rank(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(As, Bs, weights)`` must return the rank (an int) of the exact weighted sum
    sum_i w_i B_i A_i of LoRA updates, A_i (r_i, in) and B_i (out, r_i) float64: the rank a single
    adapter needs to hold that sum without loss.  Checked on generic, shared, cancelling and
    capped cases whose rank is known by construction."""
    for what, As, Bs, ws, want in _rank_cases():
        got, problem = _run_answer(fn, [a.clone() for a in As], [b.clone() for b in Bs], list(ws), where=what)
        if problem is not None:
            return _report(problem, quiet)
        if torch.is_tensor(got) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, int):
            return _report(Verdict(False, f"return the rank as an int, got {type(got).__name__}"), quiet)
        if got == want:
            continue
        ranks = sum(a.shape[0] for a in As)
        if got == ranks and want < ranks:
            msg = f"for {what}: {got} is the sum of the ranks, an upper bound; compute the rank of the sum itself"
        elif got == max(a.shape[0] for a in As):
            msg = (f"for {what}: {got} is one adapter's rank: that is what a factor-wise ('linear') merge keeps, "
                   f"not the rank of the exact sum")
        else:
            msg = f"for {what}: got {got}, expected another rank (use torch.linalg.matrix_rank on the sum)"
        return _report(Verdict(False, msg), quiet)
    return _report(Verdict(True, "the rank of the exact sum in every case: generic sums need the sum of the ranks"),
                   quiet)
