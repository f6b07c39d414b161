"""The unified view: prefix-tuning is a gated parallel adapter (He et al. 2022).

He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning"
(arXiv:2110.04366), building on Houlsby et al. 2019 (adapters), Li & Liang 2021
(prefix-tuning) and Hu et al. 2021 (LoRA). Explained in notebooks/05_adapters.ipynb,
section "The unified view".

Derivation (one query q, scores scaled by c = 1/sqrt(head_dim)). Prefix-tuning lets q
attend over m learned keys/values P_k, P_v (m, hd) in front of the n real ones K, V:

    out = sum_j e^{c q.p_j} p^v_j / Z  +  sum_i e^{c q.k_i} v_i / Z,     Z = Z_P + Z_K,
    Z_P = sum_j e^{c q.p_j},   Z_K = sum_i e^{c q.k_i}.

Multiplying and dividing each sum by its own normaliser:

    out = (Z_P / Z) Attn(q, P_k, P_v) + (Z_K / Z) Attn(q, K, V)
        = (1 - lam) Attn(q, K, V) + lam Attn(q, P_k, P_v),   lam = Z_P / (Z_P + Z_K)
                                                                 = sigmoid(logsumexp_P - logsumexp_K).

The second term is an adapter beside the attention: with q = x W_q^T it is
softmax(x W_down^T) W_up^T with W_down = c P_k W_q (m, d), f = softmax, W_up = P_v^T (hd, m):
a parallel adapter whose bottleneck is the prefix length m, gated by lam(x). LoRA is the same
picture with f = identity, sitting beside one weight matrix; a Houlsby adapter is serial
(it reads the sub-layer's output) with f = ReLU.
"""

from __future__ import annotations

import torch

__all__ = ["attention", "attention_with_prefix", "prefix_gate", "gated_parallel_form", "prefix_as_adapter",
           "METHOD_TABLE"]

# where each method sits and what it computes, the table of He et al. 2022 (Table 1), in our words
METHOD_TABLE = [
    # method, inserted form, where, modified representation, function f, composition
    ("LoRA", "parallel", "beside W_q / W_v (one weight matrix)", "the matrix's input x", "identity", "h + s * x A^T B^T"),
    ("prefix-tuning", "parallel", "beside each attention head", "the head's input x", "softmax", "(1 - lam) h + lam * f(x W_down^T) W_up^T"),
    ("Houlsby adapter", "serial", "after attention and after FFN", "the sub-layer's output h", "ReLU", "h + f(h W_down^T) W_up^T"),
    ("parallel adapter", "parallel", "beside the FFN", "the FFN's input x", "ReLU", "h + s * f(x W_down^T) W_up^T"),
]


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def attention(q, k, v, mask=None, scale=None) -> torch.Tensor:
    """softmax(c q k^T + mask) v: q (..., n, hd), k/v (..., t, hd), mask (..., n, t) additive -> (..., n, hd)."""
    scores = q @ k.transpose(-1, -2) * _scale(q, scale)  # (..., n, t)
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1) @ v  # (..., n, t) @ (..., t, hd) -> (..., n, hd)


def attention_with_prefix(q, k, v, pk, pv, mask=None, scale=None) -> torch.Tensor:
    """Attention over [P_k; K] and [P_v; V]; pk/pv (..., m, hd) broadcast against k/v -> (..., n, hd)."""
    pk = pk.expand(*k.shape[:-2], *pk.shape[-2:])  # (..., m, hd)
    pv = pv.expand(*v.shape[:-2], *pv.shape[-2:])
    if mask is not None:  # every query sees every prefix slot: zeros in front of the mask
        mask = torch.cat([mask.new_zeros(*mask.shape[:-1], pk.shape[-2]), mask], dim=-1)  # (..., n, m + t)
    return attention(q, torch.cat([pk, k], -2), torch.cat([pv, v], -2), mask, scale)


def prefix_gate(q, k, pk, mask=None, scale=None) -> torch.Tensor:
    """lam = Z_P / (Z_P + Z_K) per query, (..., n, 1), computed stably as sigmoid(lse_P - lse_K)."""
    c = _scale(q, scale)
    sk = q @ k.transpose(-1, -2) * c  # (..., n, t)
    if mask is not None:
        sk = sk + mask
    sp = q @ pk.transpose(-1, -2) * c  # (..., n, m)
    return torch.sigmoid(sp.logsumexp(-1, keepdim=True) - sk.logsumexp(-1, keepdim=True))  # (..., n, 1)


def gated_parallel_form(q, k, v, pk, pv, mask=None, scale=None) -> torch.Tensor:
    """(1 - lam) Attn(q, K, V) + lam Attn(q, P_k, P_v): equal to :func:`attention_with_prefix` (see the docstring)."""
    lam = prefix_gate(q, k, pk, mask, scale)  # (..., n, 1)
    return (1 - lam) * attention(q, k, v, mask, scale) + lam * attention(q, pk, pv, None, scale)


def prefix_as_adapter(w_q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, scale: float | None = None,
                      b_q: torch.Tensor | None = None):
    """The adapter weights of one head's prefix term: Attn(x W_q^T + b_q, P_k, P_v) = softmax(x W_down^T + b_down) W_up^T.

    w_q (hd, d) and b_q (hd) are the head's query projection, pk/pv (m, hd). Returns W_down (m, d),
    b_down (m), W_up (hd, m): the bottleneck width is the prefix length m.
    """
    c = pk.shape[-1] ** -0.5 if scale is None else scale
    b_down = c * pk @ b_q if b_q is not None else pk.new_zeros(pk.shape[0])  # (m, hd) @ (hd,) -> (m,)
    return c * pk @ w_q, b_down, pv.transpose(-1, -2)  # (m, hd) @ (hd, d) -> (m, d); (m,); (hd, m)
