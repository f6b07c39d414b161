"""Low-rank approximation, singular-value spectra and parameter-count formulas.

The maths behind LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", arXiv:2106.09685), explained in ``notebooks/02_the_maths.ipynb``:

* Eckart-Young (1936; Mirsky 1960 for every unitarily invariant norm): with the SVD
  W = U diag(s) V^T and s_1 >= s_2 >= ..., the best rank-r approximation of W in the
  Frobenius norm is the truncated SVD W_r = U_r diag(s_1..s_r) V_r^T, and

      ||W - W_r||_F = sqrt(s_{r+1}^2 + s_{r+2}^2 + ...)

  (section "Low-rank approximation and the SVD"). ``best_rank_r`` / ``reconstruction_error``
  compute the left-hand side by building W_r, ``eckart_young_error`` the right-hand side
  from the singular values; the notebook and the tests check that they agree.
* The share of ||W||_F^2 kept by the top r directions (``energy_captured``) and the rank
  needed to keep a given share (``rank_for_energy``): the numbers the notebook measures
  on a real full fine-tuning update Delta W = W_after - W_before of MiniLM
  (section "The spectrum of a real fine-tuning update"), against a Gaussian matrix of the
  same shape and norm (``random_spectrum``).
* Trainable-parameter counts per method (section "What each method costs"):
  LoRA r * (d_in + d_out) per adapted matrix; prefix-tuning 2 * L * m * d stored (keys and
  values, every layer) plus the reparameterisation MLP while training; prompt tuning m * d;
  a bottleneck adapter 2 * d * b + b + d, at two sites per layer in Houlsby's placement.

Every computation here runs in float64, so a difference against float32 work is the
float32 work's rounding, not this module's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "singular_values", "best_rank_r", "reconstruction_error", "eckart_young_error",
    "energy_captured", "rank_for_energy", "random_spectrum", "snapshot", "weight_updates",
    "lora_parameters", "prefix_parameters", "prompt_parameters", "adapter_parameters",
]


def _matrix(w) -> torch.Tensor:
    t = torch.as_tensor(w).detach()
    if t.dim() != 2:
        raise ValueError(f"expected a matrix (2-D tensor), got shape {tuple(t.shape)}")
    return t.to(device="cpu", dtype=torch.float64)


def _check_rank(r: int, limit: int) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"rank r must be an int >= 0, got {r!r}")
    if r > limit:
        raise ValueError(f"rank r={r} exceeds min(rows, cols)={limit} of the matrix")


def singular_values(w) -> torch.Tensor:
    """Singular values of the matrix ``w``, largest first, in float64 (shape (min(m, n),))."""
    return torch.linalg.svdvals(_matrix(w))


def best_rank_r(w, r: int) -> torch.Tensor:
    """The truncated SVD of ``w`` keeping the top ``r`` singular directions (float64, same shape)."""
    m = _matrix(w)
    _check_rank(r, min(m.shape))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)  # u (m, k), s (k,), vh (k, n)
    return (u[:, :r] * s[:r]) @ vh[:r]  # (m, r) diag(s_r) (r, n) -> (m, n)


def reconstruction_error(w, r: int) -> float:
    """||w - best_rank_r(w, r)||_F, measured by building the approximation."""
    return float(torch.linalg.matrix_norm(_matrix(w) - best_rank_r(w, r)))


def eckart_young_error(s, r: int) -> float:
    """sqrt(sum of the squared singular values after the first ``r``): the Eckart-Young error."""
    s = torch.as_tensor(s, dtype=torch.float64)
    _check_rank(r, s.numel())
    return float(torch.sqrt((s[r:] ** 2).sum()))


def energy_captured(s, r: int) -> float:
    """Share of ||W||_F^2 = sum s_i^2 kept by the top ``r`` singular values (1.0 for a zero matrix)."""
    s = torch.as_tensor(s, dtype=torch.float64)
    _check_rank(r, s.numel())
    total = float((s ** 2).sum())
    return 1.0 if total == 0.0 else float((s[:r] ** 2).sum()) / total


def rank_for_energy(s, fraction: float) -> int:
    """Smallest r whose top-r singular values keep at least ``fraction`` of sum s_i^2."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    s = torch.as_tensor(s, dtype=torch.float64)
    energy = torch.cumsum(s ** 2, 0)
    if energy.numel() == 0 or float(energy[-1]) == 0.0:
        return 0
    share = energy / energy[-1]
    # tolerate the last bit of rounding so that fraction=1.0 gives the numerical rank, not n + 1
    return int(torch.searchsorted(share, torch.tensor([fraction - 1e-12], dtype=torch.float64))[0]) + 1


def random_spectrum(shape: Sequence[int], norm: float, seed: int = 0) -> torch.Tensor:
    """Singular values of a Gaussian matrix of ``shape`` rescaled to Frobenius norm ``norm``.

    The reference a fine-tuning update is compared against: same size, same total energy,
    no structure (its spectrum follows the Marchenko-Pastur law, spread over every direction).
    """
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(*shape, generator=g, dtype=torch.float64)
    m *= norm / float(torch.linalg.matrix_norm(m))
    return torch.linalg.svdvals(m)


def snapshot(model: nn.Module, suffixes: Iterable[str] = ("query", "value")) -> dict[str, torch.Tensor]:
    """Float64 CPU copies of the ``.weight`` of every module whose name ends with one of ``suffixes``.

    Take one before and one after training; ``weight_updates`` subtracts them.
    """
    suffixes = tuple(suffixes)
    out = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in suffixes and isinstance(getattr(module, "weight", None), torch.Tensor):
            out[name] = module.weight.detach().to(device="cpu", dtype=torch.float64).clone()
    if not out:
        raise ValueError(f"no module name ends with one of {suffixes}")
    return out


def weight_updates(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Delta W = after - before for every name in ``before`` (float64); names must match."""
    missing = sorted(set(before) - set(after))
    if missing:
        raise KeyError(f"names missing after training: {missing[:5]}")
    out = {}
    for name, w0 in before.items():
        w1 = torch.as_tensor(after[name]).detach().to(device="cpu", dtype=torch.float64)
        if w1.shape != w0.shape:
            raise ValueError(f"{name}: shape {tuple(w0.shape)} before but {tuple(w1.shape)} after")
        out[name] = w1 - w0
    return out


# --- parameter counts (notebooks/02_the_maths.ipynb, "What each method costs") ---------------

def _positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def lora_parameters(d_in: int, d_out: int, r: int, matrices: int = 1) -> int:
    """LoRA on ``matrices`` weight matrices of shape (d_out, d_in): r * (d_in + d_out) each.

    A is (r, d_in) and B is (d_out, r); for a square d x d matrix that is 2 * d * r.
    """
    _positive(d_in=d_in, d_out=d_out, r=r, matrices=matrices)
    return matrices * r * (d_in + d_out)


def prefix_parameters(num_layers: int, m: int, d: int, hidden: int | None = None) -> int:
    """Prefix-tuning with ``m`` virtual tokens on ``num_layers`` layers of width ``d``.

    Stored (and used at inference): keys AND values in every layer, 2 * L * m * d.
    With ``hidden`` (the reparameterisation MLP of Li & Liang 2021, trained and then folded
    away): an (m, d) embedding, Linear(d, hidden) and Linear(hidden, 2 * L * d), i.e.
    m * d + (d * hidden + hidden) + (hidden * 2 * L * d + 2 * L * d).
    """
    _positive(num_layers=num_layers, m=m, d=d)
    width = 2 * num_layers * d
    if hidden is None:
        return m * width
    _positive(hidden=hidden)
    return m * d + (d * hidden + hidden) + (hidden * width + width)


def prompt_parameters(m: int, d: int) -> int:
    """Prompt tuning: ``m`` learned input embeddings of width ``d``, m * d."""
    _positive(m=m, d=d)
    return m * d


def adapter_parameters(d: int, b: int, sites_per_layer: int = 2, num_layers: int = 1) -> int:
    """Bottleneck adapters: (2 * d * b + b + d) per site (W_down, b_down, W_up, b_up).

    Houlsby et al. 2019 put two per layer (after attention and after the feed-forward
    block, the default here); Pfeiffer et al. 2021 put one.
    """
    _positive(d=d, b=b, sites_per_layer=sites_per_layer, num_layers=num_layers)
    return (2 * d * b + b + d) * sites_per_layer * num_layers

