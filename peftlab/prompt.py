"""Prompt tuning: m learned vectors prepended to the input embeddings.

Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(arXiv:2104.08691). The model reads [P ; E(x)] instead of E(x), with P an (m, d)
trainable matrix and everything else frozen: m * d parameters, against prefix-tuning's
2 * L * m * d_kv (Li & Liang 2021, ``peftlab/prefix.py``), which acts inside every layer.

The model returned by ``inject`` is the same object: a forward pre-hook turns
``input_ids`` (B, T) into ``inputs_embeds`` (B, m + T, d), prepends m ones to the
attention mask, -100 to token-level labels, zeros to ``token_type_ids`` and shifts
given ``position_ids`` by m. During cached generation the prompt is added once (the
cache then holds it) and later steps only get the mask and positions extended, so
``generate()`` works, greedy or sampling, batched with left padding. Causal-LM logits
come back with m extra leading positions. Explained in notebooks/04_prefix_tuning.ipynb.

Initialisation (``PromptTuningConfig.init``): by default the input embeddings of real tokens,
a neutral phrase (``peftlab.prefix.DEFAULT_PHRASE``) read with the model's tokenizer, or
m seeded vocabulary samples without one, so that step 0 is the base model reading a few
real words first; ``"random"`` (N(0, std^2) at the embedding matrix's std) only on request.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .attention import check_virtual_tokens, position_limit
from .config import PromptTuningConfig
from .registry import active_adapter, adapters_disabled
from .token_init import init_ids
from .wrappers import adapter_dtype, add_saves, delete_from_root_bank, find_saves, mark_root_bank

__all__ = ["PromptEncoder", "inject_prompt", "mark_prompt_trainable", "delete_prompt", "merge_prompt"]

CONTAINER = "prompt_tuning"  # model.prompt_tuning[name] -> PromptEncoder; its parameter is prompt_embedding
_HOOK = "peftlab_prompt_hook"


class PromptEncoder(nn.Module):
    """The (m, d) prompt of one adapter. Explained in notebooks/04_prefix_tuning.ipynb."""

    def __init__(self, num_virtual_tokens: int, hidden_size: int, std: float = 1.0, *, device=None, dtype=None):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.init_ids: torch.Tensor | None = None  # the token ids the prompt was initialised from (not saved)
        self.prompt_embedding = nn.Parameter(torch.randn(num_virtual_tokens, hidden_size, device=device,
                                                         dtype=dtype) * std)  # (m, d)

    def forward(self, batch: int) -> torch.Tensor:
        """The prompt for a batch: (batch, m, d)."""
        return self.prompt_embedding.unsqueeze(0).expand(batch, -1, -1)  # (B, m, d)


def _active_prompt(model: nn.Module) -> PromptEncoder | None:
    name = active_adapter(model)
    bank = model._modules.get(CONTAINER)
    if name is None or adapters_disabled(model) or bank is None or name not in bank:
        return None
    return bank[name]


def _past_length(kw: dict) -> int:
    cache = kw.get("cache", kw.get("past_key_values"))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


def _prompt_pre_hook(model: nn.Module, args: tuple, kwargs: dict):
    """Rewrite the forward's inputs to carry the active prompt (see the module docstring)."""
    enc = _active_prompt(model)
    if enc is None:
        return None
    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    kw = {**dict(zip(names, args)), **kwargs}
    m, past = enc.num_virtual_tokens, _past_length(kw)
    ids, embeds = kw.pop("input_ids", None), kw.get("inputs_embeds")
    ref = embeds if embeds is not None else ids
    if ref is None:
        raise ValueError("prompt tuning needs input_ids or inputs_embeds")
    batch, length = ref.shape[0], ref.shape[1]
    limit = position_limit(model)
    if limit and m + past + (length if past == 0 else 0) > limit:
        raise ValueError(f"{m} prompt vectors + {length} tokens exceed the model's limit of {limit} positions: "
                         "shorten the input (truncate to limit - num_virtual_tokens) or the prompt")
    mask = kw.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError(f"prompt tuning needs a 2-D (batch, tokens) attention mask, got {mask.dim()}-D")
    if mask is not None:
        kw["attention_mask"] = torch.cat([mask.new_ones(batch, m), mask], dim=1)  # (B, m + past + T)
    if past:  # a later generation step: the cache already holds the prompt
        if ids is not None:
            kw["input_ids"] = ids
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + m
        return (), kw
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)  # (B, T, d)
    kw["inputs_embeds"] = torch.cat([enc(batch).to(embeds.dtype), embeds], dim=1)  # (B, m + T, d)
    labels = kw.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape[1] == length:  # token-level labels
        kw["labels"] = torch.cat([labels.new_full((batch, m), -100), labels], dim=1)  # (B, m + T)
    if kw.get("token_type_ids") is not None:
        kw["token_type_ids"] = torch.cat([kw["token_type_ids"].new_zeros(batch, m), kw["token_type_ids"]], 1)
    if kw.get("position_ids") is not None:
        pos = kw["position_ids"]
        head = torch.arange(m, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], m)  # (B, m)
        kw["position_ids"] = torch.cat([head, pos + m], dim=-1)  # (B, m + T)
    return (), kw


# -- inject / trainable / delete / merge hooks (the record is peftlab.prefix_io.PROMPT) -----------
def inject_prompt(model: nn.Module, config: PromptTuningConfig, name: str) -> None:
    m = check_virtual_tokens(model, config)
    emb = model.get_input_embeddings()
    if emb is None or not hasattr(emb, "weight"):
        raise TypeError(f"{type(model).__name__} has no input embedding matrix: prompt tuning needs one")
    plan = find_saves(model, config.modules_to_save)
    device, dtype = emb.weight.device, adapter_dtype(next(model.parameters()))
    std = float(emb.weight.detach().float().std())  # init="random": on the scale of real embeddings
    enc = PromptEncoder(m, emb.weight.shape[1], std, device=device, dtype=dtype)
    if config.init != "random":  # the input embeddings of m real tokens (a neutral phrase, sampled ids or words)
        ids = init_ids(model, config, m)
        with torch.no_grad():
            enc.prompt_embedding.copy_(emb(ids.to(device)))  # (m, d), as the input's tokens are embedded
        enc.init_ids = ids
    add_saves(model, config.modules_to_save, name, plan)
    if CONTAINER not in model._modules:
        model.add_module(CONTAINER, nn.ModuleDict())
        model.__dict__[_HOOK] = model.register_forward_pre_hook(_prompt_pre_hook, with_kwargs=True)
    model._modules[CONTAINER][name] = enc


def mark_prompt_trainable(model: nn.Module, config: PromptTuningConfig, name: str) -> None:
    mark_root_bank(model, CONTAINER, name)


def delete_prompt(model: nn.Module, name: str) -> None:
    if delete_from_root_bank(model, CONTAINER, name):  # the last prompt adapter: remove the input hook too
        model.__dict__.pop(_HOOK).remove()


def merge_prompt(model: nn.Module, name: str) -> None:
    raise RuntimeError(f"adapter {name!r} is prompt tuning: its prompt is already the flat tensor that gets "
                       "saved, so there is nothing to merge")
