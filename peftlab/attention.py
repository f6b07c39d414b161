"""transformers 5's attention interface, as peftlab's prefix-tuning and probes use it.

BERT, RoBERTa, DistilBERT, GPT-2 and Llama attention layers project q, k, v (apply RoPE,
update the KV cache) and then call ``ALL_ATTENTION_FUNCTIONS.get_interface(
config._attn_implementation, eager)``. Registering a function under a new name there and
switching the model to it (``model.set_attn_implementation(name)``) lets peftlab see and
change keys and values in every layer with no ``past_key_values`` plumbing:

* :func:`register_attention` adds an implementation (its masks are built as for eager);
* :func:`eager_for` is the eager function of a module's own file (exact base behaviour);
* :func:`extend_mask` prepends columns to an attention mask;
* :func:`record_attention` runs the frozen base model once and returns what each attention
  call saw (keys and values after projection and RoPE); :func:`attention_sites` lists the
  self-attention modules in call order.

Explained in notebooks/04_prefix_tuning.ipynb.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .registry import DISABLED
from .tree import AdapterLayer

__all__ = ["register_attention", "eager_for", "generic_eager", "extend_mask", "record_attention", "attention_sites",
           "position_limit", "check_virtual_tokens", "SUPPORTED"]

SUPPORTED = "BERT, RoBERTa, DistilBERT, GPT-2 and Llama-style models"
_PROBE = "peftlab_probe"
_RECORD: list | None = None  # filled by the probe attention while a probe runs


def position_limit(model: nn.Module) -> int | None:
    """The most positions ``model`` can encode (``max_position_embeddings``), or None."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def check_virtual_tokens(model: nn.Module, config) -> int:
    """``config.num_virtual_tokens`` (m), refused when m leaves no position for the input."""
    m, limit = config.num_virtual_tokens, position_limit(model)
    if limit and m >= limit:
        raise ValueError(f"{type(config).__name__}.num_virtual_tokens={m} reaches the model's limit of {limit} "
                         "positions, leaving no room for the input: use far fewer virtual tokens (e.g. 16)")
    return m


def generic_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Softmax attention with grouped-query support, for modules whose file has no eager function.

    query (B, H, q, hd), key/value (B, K, kv, hd) -> output (B, q, H, hd), probabilities (B, H, q, kv).
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # (B, H, kv, hd)
    value = value.repeat_interleave(groups, dim=1)  # (B, H, kv, hd)
    scores = query @ key.transpose(-1, -2) * scaling  # (B, H, q, kv)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), probs  # (B, q, H, hd), (B, H, q, kv)


def eager_for(module: nn.Module):
    """The eager attention function defined next to ``module``'s class (exact base behaviour)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn if callable(fn) else generic_eager


def extend_mask(mask: torch.Tensor | None, m: int, visible: torch.Tensor | None,
                query: torch.Tensor, kv_len: int) -> torch.Tensor | None:
    """Prepend m prefix columns to an attention mask.

    mask: None, or (B|1, 1|H, q, kv) additive float (0 = attend) or boolean (True = attend).
    visible: None (all prefix columns attend) or a bool (m,) tensor.
    Returns an additive float mask (..., q, m + kv) in query's dtype, or None when nothing is masked.
    """
    if mask is None and visible is None:
        return None
    low = torch.finfo(query.dtype).min
    if mask is None:
        mask = query.new_zeros(1, 1, query.shape[2], kv_len)  # (1, 1, q, kv)
    elif mask.dtype == torch.bool:
        mask = query.new_zeros(mask.shape).masked_fill(~mask, low)  # bool -> additive
    if mask.shape[-1] != kv_len:
        raise RuntimeError(f"attention mask covers {mask.shape[-1]} keys but the layer has {kv_len}")
    cols = mask.new_zeros(*mask.shape[:-1], m)  # (B|1, 1|H, q, m): 0 = attend
    if visible is not None:
        cols = cols.masked_fill(~visible.to(device=cols.device, dtype=torch.bool), low)
    return torch.cat([cols, mask.to(query.dtype)], dim=-1)  # (B|1, 1|H, q, m + kv)


def register_attention(name: str, fn: Callable) -> None:
    """Make ``model.set_attn_implementation(name)`` call ``fn``, with masks built exactly as for eager."""
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, eager_mask)


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    if _RECORD is not None:
        _RECORD.append((module, query.shape[1], key.detach(), value.detach()))
    return eager_for(module)(module, query, key, value, attention_mask, **kwargs)


register_attention(_PROBE, _probe_attention)


# -- finding the attention layers ---------------------------------------------------------
@contextmanager
def _frozen_run(model: nn.Module) -> Iterator[None]:
    """Eval mode, no grad, every adapter off, for a probe forward; everything restored afterwards.

    Off means: methods without layers of their own (the root's ``peftlab_disabled`` flag) and every
    :class:`peftlab.tree.AdapterLayer` (LoRA, ``modules_to_save`` copies: their own ``disabled`` flag), so a probe sees the
    frozen base model whichever adapter is active. Merged LoRA weights cannot be switched off
    (``inject`` refuses to add an adapter to a merged model before any probe runs).
    """
    modes = [(m, m.training) for m in model.modules()]
    switches = [(m, m.disabled) for m in model.modules() if isinstance(m, AdapterLayer) and not m.is_merged]
    flag = model.__dict__.get(DISABLED)
    model.eval()
    model.__dict__[DISABLED] = True
    for m, _ in switches:
        m.disabled = True
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        for m, was in switches:
            m.disabled = was
        if flag is None:
            model.__dict__.pop(DISABLED, None)
        else:
            model.__dict__[DISABLED] = flag


def record_attention(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
                     ) -> list[tuple[nn.Module, int, torch.Tensor, torch.Tensor]]:
    """Run the frozen base ``model`` (every adapter off) on ``input_ids`` (B, T) and return, per
    attention call in order, (module, query heads, key (B, K, T, hd), value (B, K, T, hd)) as the
    attention function sees them. ``position_ids`` (B, T), if given, is passed to the forward.

    The model is left exactly as it was. Raises ``TypeError`` for an unsupported architecture.
    """
    global _RECORD
    cls = type(model).__name__
    need = (f"peftlab's prefix-tuning needs a transformers 5 model whose attention layers call "
            f"ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...) with keys/values shaped "
            f"(batch, kv_heads, seq, head_dim) after projection ({SUPPORTED} do)")
    if not hasattr(model, "set_attn_implementation") or getattr(model, "config", None) is None:
        raise TypeError(f"{cls} is not a transformers PreTrainedModel: {need}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise TypeError(f"{cls} is an encoder-decoder model, which peftlab's prefix-tuning does not support: {need}")
    before = model.config._attn_implementation
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "cannot set dynamically" warning becomes our error
    try:
        model.set_attn_implementation(_PROBE)
        if model.config._attn_implementation != _PROBE:
            raise TypeError(f"{cls} cannot switch its attention implementation: {need}")
        _RECORD = []
        with _frozen_run(model):
            device = next(model.parameters()).device
            extra = {} if position_ids is None else {"position_ids": position_ids.to(device)}
            model(input_ids=input_ids.to(device), attention_mask=torch.ones_like(input_ids, device=device), **extra)
        calls, _RECORD = _RECORD, None
    finally:
        _RECORD = None
        if model.config._attn_implementation != before:
            model.set_attn_implementation(before)
        transformers.logging.set_verbosity(level)
    if not calls:
        raise TypeError(f"{cls}'s forward never called the attention interface: {need}")
    return calls


def attention_sites(model: nn.Module) -> tuple[list[nn.Module], int, int]:
    """The self-attention modules in call order, and their (kv_heads, head_dim) shared by all layers."""
    calls = record_attention(model, torch.zeros(1, 2, dtype=torch.long))
    modules, shapes = [], set()
    for mod, _, k, _ in calls:
        if all(mod is not seen for seen in modules):  # a layer shared across depth gets one prefix
            modules.append(mod)
            shapes.add((k.shape[1], k.shape[-1]))
    if len(shapes) != 1:
        raise TypeError(f"{type(model).__name__} has layers with different key/value shapes {sorted(shapes)}; "
                        "peftlab's prefix-tuning needs one (kv_heads, head_dim) for every layer")
    (heads, head_dim), = shapes
    return modules, heads, head_dim


