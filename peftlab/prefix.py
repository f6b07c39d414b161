"""Prefix-tuning: learned keys and values prepended in every attention layer.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"
(arXiv:2101.00190). Every attention layer l gets m extra key/value pairs
(P_K^l, P_V^l), each (kv_heads, m, head_dim); a query attends to them as if they
were m more tokens in front of the input:

    softmax(q [P_K^l ; K]^T * scaling + [0 ; mask]) [P_V^l ; V]

With ``projection=True`` the prefixes come from an MLP (the paper's stabiliser):
an (m, d) embedding -> Linear(d, hidden) -> tanh -> Linear(hidden, L * 2 * kv_dim);
:func:`peftlab.merge` folds it into the flat (m, L * 2 * kv_dim) tensor, which is
HF peft's ``prompt_embeddings`` layout (per virtual token: layer-major, key then
value, heads, head_dim) and is what gets saved. Prompt tuning (Lester et al. 2021,
learned input embeddings) lives in ``peftlab/prompt.py``.

How it plugs into transformers 5 (no ``past_key_values`` plumbing): BERT, RoBERTa,
DistilBERT, GPT-2 and Llama attention layers project q, k, v (apply RoPE, update the
KV cache) and then call ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
eager)``. peftlab registers the implementation ``"peftlab_prefix"`` (the plumbing is in
``peftlab/attention.py``): it prepends the
layer's prefix (post-RoPE: prefix keys carry no position), prepends m "attend" mask
columns and calls the model's own eager attention, so the probabilities it returns
include the prefix columns. The cache only ever holds real tokens; positions of real
tokens are unchanged (HF peft numbers them from m instead). For rotary models saving and
loading convert between the two exactly (prefix keys turned by +-m positions, see
``peftlab/prefix_io.py``), so a saved folder gives the same logits in HF peft at default
positions; for absolute positions (GPT-2) no conversion exists and ``save_adapter`` warns.
Explained in notebooks/04_prefix_tuning.ipynb.

Initialisation (``PrefixConfig.init``): by default every layer's prefix is the keys and
values the frozen base model (all adapters off) computes for m real tokens, a neutral
phrase (``DEFAULT_PHRASE``) read with the model's own tokenizer, or m seeded vocabulary
samples when there is none (Li & Liang 2021 found real-word activations better than
random ones). Rotary models read them at positions -m..-1, so a causal Llama-style model
starts out computing exactly what the base model computes for phrase + input. N(0, 1)
prefixes (``init="random"``) are on no scale the model knows; they are kept on request only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .attention import (SUPPORTED, attention_sites, check_virtual_tokens, eager_for, extend_mask, record_attention,
                        register_attention)
from .config import PrefixConfig
from .registry import active_adapter, adapters_disabled, configs
from .token_init import DEFAULT_PHRASE, init_ids
from .wrappers import adapter_dtype, add_saves, delete_from_root_bank, find_saves, mark_root_bank

__all__ = ["PrefixEncoder", "prefix_attention", "attention_sites", "prefix_visible", "ATTN_NAME", "DEFAULT_PHRASE",
           "record_attention", "extend_mask", "SUPPORTED"]

ATTN_NAME = "peftlab_prefix"
CONTAINER = "prefix_tuning"  # model.prefix_tuning[name] -> PrefixEncoder; every parameter is named prefix_*
SITE_KEY = "peftlab_prefix_site"  # set on each attention module: (root model, layer index)
_BEFORE = "peftlab_attn_before"  # the attention implementation to restore on delete


# -- the attention function ----------------------------------------------------------------
def _active_prefix(module: nn.Module):
    """(PrefixEncoder, layer index) that applies to this attention module now, or None."""
    site = module.__dict__.get(SITE_KEY)
    if site is None:
        return None
    root, index = site
    name = active_adapter(root)
    bank = root._modules.get(CONTAINER)
    if name is None or adapters_disabled(root) or bank is None or name not in bank:
        return None
    return bank[name], index


def prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention with the active adapter's prefix prepended (registered as ``"peftlab_prefix"``).

    query (B, H, q, hd); key/value (B, K, kv, hd) after projection, RoPE and cache update;
    returns output (B, q, H, hd) and probabilities (B, H, q, m + kv), prefix columns first.
    Explained in notebooks/04_prefix_tuning.ipynb, section "Prefix-tuning in cells".
    """
    eager = eager_for(module)
    found = _active_prefix(module)
    if found is None:  # no prefix here (cross-attention, adapter inactive or disabled)
        return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    enc, layer = found
    pk, pv = enc.layer_kv(layer, query.shape[0])  # (B, K, m, hd) each
    if pk.shape[1] != key.shape[1] or pk.shape[-1] != key.shape[-1]:
        raise RuntimeError(f"prefix is shaped for {pk.shape[1]} heads x {pk.shape[-1]} but layer {layer} "
                           f"has {key.shape[1]} x {key.shape[-1]}")
    mask = extend_mask(attention_mask, enc.num_virtual_tokens, enc.visible, query, key.shape[2])
    key = torch.cat([pk.to(key.dtype), key], dim=2)  # (B, K, m + kv, hd)
    value = torch.cat([pv.to(value.dtype), value], dim=2)  # (B, K, m + kv, hd)
    return eager(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


register_attention(ATTN_NAME, prefix_attention)


# -- the prefix parameters ------------------------------------------------------------------
class PrefixEncoder(nn.Module):
    """The prefixes of one adapter: flat (m, L * 2 * K * hd), or an MLP producing them.

    ``layer_kv(l, B)`` returns the keys and values of layer l, each (B, K, m, hd).
    ``visible`` (None or a bool (m,) tensor) hides prefix positions from every query.
    Explained in notebooks/04_prefix_tuning.ipynb.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, num_virtual_tokens: int,
                 hidden_size: int, projection_hidden: int | None = None, *, device=None, dtype=None) -> None:
        super().__init__()
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.num_virtual_tokens = num_virtual_tokens
        self.visible: torch.Tensor | None = None
        self.init_ids: torch.Tensor | None = None  # the token ids the prefix was initialised from (not saved)
        width = num_layers * 2 * kv_heads * head_dim
        kw = {"device": device, "dtype": dtype}
        if projection_hidden:
            self.prefix_embedding = nn.Parameter(torch.randn(num_virtual_tokens, hidden_size, **kw))  # (m, d)
            self.prefix_mlp = nn.Sequential(nn.Linear(hidden_size, projection_hidden, **kw), nn.Tanh(),
                                            nn.Linear(projection_hidden, width, **kw))
        else:
            self.prefix_keys_values = nn.Parameter(torch.randn(num_virtual_tokens, width, **kw))  # (m, L*2*K*hd)

    @property
    def projected(self) -> bool:
        return "prefix_mlp" in self._modules

    def flat(self) -> torch.Tensor:
        """All prefixes as one (m, L * 2 * K * hd) tensor, HF peft's ``prompt_embeddings`` layout."""
        return self.prefix_mlp(self.prefix_embedding) if self.projected else self.prefix_keys_values

    def layer_kv(self, layer: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``layer``, each (batch, K, m, hd); only that layer's MLP rows are computed."""
        m, k, hd = self.num_virtual_tokens, self.kv_heads, self.head_dim
        cols = slice(layer * 2 * k * hd, (layer + 1) * 2 * k * hd)
        if self.projected:
            hidden = self.prefix_mlp[1](self.prefix_mlp[0](self.prefix_embedding))  # (m, hidden)
            last = self.prefix_mlp[2]
            flat = F.linear(hidden, last.weight[cols], last.bias[cols])  # (m, 2*K*hd)
        else:
            flat = self.prefix_keys_values[:, cols]  # (m, 2*K*hd)
        kv = flat.reshape(m, 2, k, hd).permute(1, 2, 0, 3)  # (2, K, m, hd)
        return (kv[0].unsqueeze(0).expand(batch, -1, -1, -1),  # (B, K, m, hd)
                kv[1].unsqueeze(0).expand(batch, -1, -1, -1))

    def load_flat(self, flat: torch.Tensor) -> None:
        """Make the encoder produce ``flat`` (m, width): copied, or solved into the MLP's last layer.

        With the MLP: b = mean of the rows, W^T = pinv(H) (flat - b) with H = tanh(E W1^T + b1);
        exact when H (m, hidden) has full row rank, i.e. hidden >= m.
        """
        with torch.no_grad():
            if not self.projected:
                self.prefix_keys_values.copy_(flat)
                return
            last = self.prefix_mlp[2]
            hidden = self.prefix_mlp[1](self.prefix_mlp[0](self.prefix_embedding)).double()  # (m, hidden)
            target = flat.double()  # (m, width)
            bias = target.mean(0)  # (width,)
            weight_t = torch.linalg.pinv(hidden) @ (target - bias)  # (hidden, width)
            last.weight.copy_(weight_t.T.to(last.weight.dtype))
            last.bias.copy_(bias.to(last.bias.dtype))

    def fold(self) -> None:
        """Replace the MLP by the flat tensor it produces now (what ``peftlab.merge`` does)."""
        if not self.projected:
            raise RuntimeError("this prefix is already flat: there is no MLP to merge")
        trainable = self.prefix_embedding.requires_grad
        flat = self.flat().detach().clone()
        del self.prefix_embedding, self.prefix_mlp
        self.prefix_keys_values = nn.Parameter(flat, requires_grad=trainable)  # (m, L*2*K*hd)

    def extra_repr(self) -> str:
        kind = "mlp" if self.projected else "flat"
        return (f"layers={self.num_layers}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"m={self.num_virtual_tokens}, {kind}")


def rotary(model: nn.Module) -> bool:
    """Whether ``model`` encodes positions with rotary embeddings (Llama-style: relative, in q and k)."""
    return any(type(mod).__name__.endswith("RotaryEmbedding") for mod in model.modules())


def text_prefix(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The frozen base model's own keys and values for ``ids`` (m,), as a flat (m, L * 2 * K * hd) tensor.

    Computed with every adapter off. With rotary positions the tokens sit at positions -m..-1, just
    before the input's 0..T-1, so a causal model with this prefix computes exactly what the base model
    computes for the phrase followed by the input (absolute-position models read them at 0..m-1).
    """
    m = ids.shape[0]
    pos = torch.arange(-m, 0).unsqueeze(0) if rotary(model) else None  # (1, m)
    calls, seen = [], []
    for mod, _, k, v in record_attention(model, ids.unsqueeze(0), pos):
        if all(mod is not s for s in seen):
            seen.append(mod)
            calls.append(torch.stack([k[0], v[0]]))  # (2, K, m, hd)
    kv = torch.stack(calls)  # (L, 2, K, m, hd)
    return kv.permute(3, 0, 1, 2, 4).reshape(ids.shape[0], -1)  # (m, L*2*K*hd)


@contextmanager
def prefix_visible(model: nn.Module, visible: torch.Tensor | None, name: str | None = None) -> Iterator[None]:
    """Within the block, only prefix positions where ``visible`` (bool (m,)) is True are attended to."""
    enc = model._modules[CONTAINER][name or active_adapter(model)]
    before, enc.visible = enc.visible, visible
    try:
        yield
    finally:
        enc.visible = before


# -- inject / trainable / delete / merge hooks (the record is peftlab.prefix_io.PREFIX) -----------
def inject_prefix(model: nn.Module, config: PrefixConfig, name: str) -> None:
    m = check_virtual_tokens(model, config)
    if config.projection and config.init != "random" and config.projection_hidden < m:
        raise ValueError(f"init={config.init!r} with projection needs projection_hidden >= num_virtual_tokens "
                         f"({config.projection_hidden} < {m}) for the MLP to reproduce real tokens' keys and values: "
                         f"raise projection_hidden to at least {m}, or use projection=False")
    sites, heads, head_dim = attention_sites(model)  # every check runs before the model changes
    plan = find_saves(model, config.modules_to_save)
    ref = next(model.parameters())
    device, dtype = ref.device, adapter_dtype(ref)
    enc = PrefixEncoder(len(sites), heads, head_dim, m, model.config.hidden_size,
                        config.projection_hidden if config.projection else None, device=device, dtype=dtype)
    if config.init != "random":  # the base model's own keys/values for m real tokens; MLP solved to match
        ids = init_ids(model, config, m)
        enc.load_flat(text_prefix(model, ids).to(device, dtype))
        enc.init_ids = ids
    add_saves(model, config.modules_to_save, name, plan)
    if CONTAINER not in model._modules:
        model.add_module(CONTAINER, nn.ModuleDict())
        model.__dict__[_BEFORE] = model.config._attn_implementation
    model._modules[CONTAINER][name] = enc
    for index, mod in enumerate(sites):
        mod.__dict__[SITE_KEY] = (model, index)
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)


def mark_prefix_trainable(model: nn.Module, config: PrefixConfig, name: str) -> None:
    mark_root_bank(model, CONTAINER, name)


def delete_prefix(model: nn.Module, name: str) -> None:
    if delete_from_root_bank(model, CONTAINER, name):  # the last prefix adapter: put the model back as it was
        for mod in model.modules():
            mod.__dict__.pop(SITE_KEY, None)
        model.set_attn_implementation(model.__dict__.pop(_BEFORE, "eager"))


def merge_prefix(model: nn.Module, name: str) -> None:
    model._modules[CONTAINER][name].fold()


def refuse_unload(model: nn.Module, name: str) -> None:
    """Prefix and prompt tuning change what attention reads, not a weight: unload() cannot fold them."""
    kind = type(configs(model)[name]).__name__
    raise RuntimeError(f"adapter {name!r} is a {kind}: it adds keys/values or inputs, not weight updates, so "
                       f"unload() cannot merge it into the weights; remove it with peftlab.delete(model, {name!r})")
