"""Merging task vectors: weighted sums, TIES, DARE and magnitude pruning, on plain tensors.

A *task vector* tau_i is what fine-tuning on task i added to a weight (for LoRA: one adapter's
s_i B_i A_i, or one of its factors).  Every function here takes n task tensors of one shape S
and weights w (n,) and returns one tensor of shape S; none knows about models or adapters
(``peftlab.arithmetic`` applies them to LoRA layers).  The rules, by paper:

* task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089):
  tau = sum_i w_i tau_i;
* magnitude pruning: keep the k = floor(density * numel) entries of largest |tau_i|, zero the rest;
* TIES (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models",
  arXiv:2306.01708): trim each tau_i by magnitude, elect one sign per entry, then average, per
  entry, only the weighted values that agree with the elected sign (the "disjoint mean");
* DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous
  Models as a Free Lunch", arXiv:2311.03099): drop each entry with probability 1 - density and
  divide the survivors by density (the expectation is unchanged), then sum (``dare_linear``) or
  TIES-combine (``dare_ties``).

The conventions follow HF peft's ``add_weighted_adapter`` so that results agree with it: the sign
is elected on the trimmed but *unweighted* tensors, the weights are applied afterwards, an entry
where no tensor agrees with the elected sign is 0, and ``density == 1`` prunes nothing (and draws
no random numbers).  The DARE masks come from ``torch.bernoulli`` on the global generator, one
tensor after the other: seed ``torch`` to repeat a merge.  Explained in
notebooks/12_adapter_arithmetic.ipynb.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["task_arithmetic", "magnitude_prune", "random_drop", "elect_sign", "disjoint_mean", "ties",
           "dare_linear", "dare_ties", "magnitude_prune_merge", "MERGES", "SIGN_METHODS"]

SIGN_METHODS = ("total", "frequency")


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(tensors) == 0:
        raise ValueError("no task tensors to merge: pass at least one")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"task tensors must all have one shape, got {sorted(shapes)}")
    return torch.stack(list(tensors), dim=0)  # (n, *S)


def _weighted(stacked: torch.Tensor, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """w_i * tau_i for each i: stacked (n, *S), weights (n,) -> (n, *S)."""
    w = torch.as_tensor(weights, dtype=torch.float32 if not torch.is_tensor(weights) else None)
    w = w.to(stacked.device)
    if w.shape != stacked.shape[:1]:
        raise ValueError(f"need one weight per task tensor: {stacked.shape[0]} tensors, weights of shape "
                         f"{tuple(w.shape)}")
    return stacked * w.view(-1, *([1] * (stacked.dim() - 1)))  # (n,) -> (n, 1, ..., 1) broadcasts over S


def task_arithmetic(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """tau = sum_i w_i tau_i.  tensors: n of shape S; weights (n,) -> S."""
    return _weighted(_stack(tensors), weights).sum(dim=0)  # (n, *S) -> S


def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = floor(density * numel) entries of largest |tau| (TIES's "trim"), zero the others.

    Same shape as ``tensor``.  ``density >= 1`` returns it unchanged.
    """
    if density >= 1:
        return tensor
    flat = tensor.reshape(-1)  # S -> (numel,)
    k = int(density * flat.numel())
    keep = torch.zeros_like(flat)
    keep[torch.topk(flat.abs(), k=k, largest=True).indices] = 1
    return tensor * keep.reshape(tensor.shape)  # (numel,) -> S


def random_drop(tensor: torch.Tensor, density: float, rescale: bool = True) -> torch.Tensor:
    """DARE's drop: keep each entry with probability ``density`` (a Bernoulli mask m), then
    tau' = m * tau / density when ``rescale`` (so E[tau'] = tau).  Same shape as ``tensor``.

    Draws ``tensor.numel()`` numbers from the global torch generator; ``density >= 1`` draws none.
    """
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density))  # 1 with probability density
    dropped = tensor * mask
    return dropped / density if rescale else dropped


def elect_sign(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES's sign election: a bool mask (n, *S), True where tau_i's sign is the elected one.

    The elected sign of an entry is that of sum_i tau_i (``"total"``: the mass decides) or of
    sum_i sign(tau_i) (``"frequency"``: the head count decides); a tie (0) elects +.  A zero entry
    never agrees with either sign, so pruned entries do not count in the mean.
    """
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
    signs = stacked.sign()  # (n, *S) in {-1, 0, +1}
    score = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)  # S
    elected = torch.where(score >= 0, 1, -1)  # S
    return signs == elected  # (n, *S) against S broadcasts


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """TIES's merge: per entry, the mean of the values that agree with the elected sign.

    weighted (n, *S): w_i tau_i; agree (n, *S) from :func:`elect_sign`.  Returns S:
    sum_i agree_i w_i tau_i / max(1, sum_i agree_i).
    """
    count = agree.sum(dim=0).clamp(min=1)  # S; at least 1, so an entry nobody keeps stays 0
    return (weighted * agree).sum(dim=0) / count  # (n, *S) -> S


def ties(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor, density: float,
         majority_sign_method: str = "total") -> torch.Tensor:
    """TIES-merging: trim each tau_i to ``density``, elect signs, disjoint mean of w_i tau_i.  n of S -> S."""
    trimmed = _stack([magnitude_prune(t, density) for t in tensors])  # (n, *S)
    agree = elect_sign(trimmed, majority_sign_method)  # on the unweighted tensors, as peft does
    return disjoint_mean(_weighted(trimmed, weights), agree)


def dare_linear(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor,
                density: float) -> torch.Tensor:
    """DARE then task arithmetic: sum_i w_i m_i tau_i / density.  n of S -> S (random: seed torch)."""
    return task_arithmetic([random_drop(t, density) for t in tensors], weights)


def dare_ties(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor, density: float,
              majority_sign_method: str = "total") -> torch.Tensor:
    """DARE's random drop-and-rescale in place of TIES's trim, then sign election and disjoint mean."""
    dropped = _stack([random_drop(t, density) for t in tensors])  # (n, *S)
    agree = elect_sign(dropped, majority_sign_method)
    return disjoint_mean(_weighted(dropped, weights), agree)


def magnitude_prune_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor,
                          density: float) -> torch.Tensor:
    """Trim each tau_i by magnitude, then task arithmetic: sum_i w_i trim(tau_i).  n of S -> S."""
    return task_arithmetic([magnitude_prune(t, density) for t in tensors], weights)


# combination rule -> (function, whether it takes density, whether it takes majority_sign_method)
MERGES = {
    "linear": (lambda ts, w, density, sign: task_arithmetic(ts, w), False, False),
    "ties": (lambda ts, w, density, sign: ties(ts, w, density, sign), True, True),
    "dare_linear": (lambda ts, w, density, sign: dare_linear(ts, w, density), True, False),
    "dare_ties": (lambda ts, w, density, sign: dare_ties(ts, w, density, sign), True, True),
    "magnitude_prune": (lambda ts, w, density, sign: magnitude_prune_merge(ts, w, density), True, False),
}
