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
eager)``. peftlab registers the implementation ``"peftlab_prefix"``: it prepends the
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

import sys
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import PrefixConfig
from .inject import MethodHooks, configs, register_method
from .lora import LoRALinear
from .targets import replace_module, walk
from .wrappers import ModulesToSaveWrapper

__all__ = ["PrefixEncoder", "prefix_attention", "attention_sites", "prefix_visible", "ATTN_NAME"]

ATTN_NAME = "peftlab_prefix"
_PROBE = "peftlab_probe"
CONTAINER = "prefix_tuning"  # model.prefix_tuning[name] -> PrefixEncoder; every parameter is named prefix_*
_SITE = "peftlab_prefix_site"  # set on each attention module: (root model, layer index)
_BEFORE = "peftlab_attn_before"  # the attention implementation to restore on delete
_RECORD: list | None = None  # filled by the probe attention while a probe runs
SUPPORTED = "BERT, RoBERTa, DistilBERT, GPT-2 and Llama-style models"


# -- the attention function ------------------------------------------------------------
def _generic_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
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


def _own_eager(module: nn.Module):
    """The eager attention function defined next to ``module``'s class (exact base behaviour)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn if callable(fn) else _generic_eager


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


def _active_prefix(module: nn.Module):
    """(PrefixEncoder, layer index) that applies to this attention module now, or None."""
    site = module.__dict__.get(_SITE)
    if site is None:
        return None
    root, index = site
    name = root.__dict__.get("peftlab_active")
    bank = root._modules.get(CONTAINER)
    if name is None or root.__dict__.get("peftlab_disabled") or bank is None or name not in bank:
        return None
    return bank[name], index


def prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention with the active adapter's prefix prepended (registered as ``"peftlab_prefix"``).

    query (B, H, q, hd); key/value (B, K, kv, hd) after projection, RoPE and cache update;
    returns output (B, q, H, hd) and probabilities (B, H, q, m + kv), prefix columns first.
    Explained in notebooks/04_prefix_tuning.ipynb, section "Prefix-tuning in cells".
    """
    eager = _own_eager(module)
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


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    if _RECORD is not None:
        _RECORD.append((module, query.shape[1], key.detach(), value.detach()))
    return _own_eager(module)(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import AttentionInterface

    for name, fn in ((ATTN_NAME, prefix_attention), (_PROBE, _probe_attention)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, eager_mask)  # masks built exactly as for eager


_register()


# -- finding the attention layers ---------------------------------------------------------
@contextmanager
def _frozen_run(model: nn.Module) -> Iterator[None]:
    """Eval mode, no grad, every adapter off, for a probe forward; everything restored afterwards.

    Off means: prefix/prompt tuning and bottleneck adapters (the root's ``peftlab_disabled`` flag)
    and LoRA layers and ``modules_to_save`` copies (their own ``disabled`` flag), so a probe sees the
    frozen base model whichever adapter is active. Merged LoRA weights cannot be switched off
    (``inject`` refuses to add an adapter to a merged model before any probe runs).
    """
    modes = [(m, m.training) for m in model.modules()]
    switches = [(m, m.disabled) for m in model.modules() if isinstance(m, (LoRALinear, ModulesToSaveWrapper))
                and not getattr(m, "merged", None)]
    flag = model.__dict__.get("peftlab_disabled")
    model.eval()
    model.__dict__["peftlab_disabled"] = True
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
            model.__dict__.pop("peftlab_disabled", None)
        else:
            model.__dict__["peftlab_disabled"] = flag


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


def position_limit(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


DEFAULT_PHRASE = ("The following text is written in plain English and can be read by anyone who is "
                  "interested in it.")  # init="auto": neutral, task-free; ~20 tokens, so m = 16 needs no repeat
VOCAB_SEED = 0  # init="vocab": the token ids are drawn from their own generator (the global RNG is untouched)
SKIP_IDS = 1000  # init="vocab" skips ids below min(SKIP_IDS, vocab // 10): BERT's [PAD]/[unusedN]/[CLS]..., byte tokens


def _load_tokenizer(model: nn.Module, config, required: bool):
    """(tokenizer, source) for ``config.tokenizer`` or the model's own; None when not ``required`` and none loads."""
    from transformers import AutoTokenizer

    source = config.tokenizer or getattr(model.config, "_name_or_path", None)
    if not source:
        if required:
            raise ValueError(f'init={config.init!r} needs a tokenizer: set tokenizer="<name or folder>" in the config')
        return None
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(source), source
    except Exception as err:  # a missing folder, no network, a folder without tokenizer files, ...
        if required:
            raise ValueError(f"could not load the tokenizer {source!r} for init={config.init!r} ({err}): "
                             'set tokenizer="<name or folder>" in the config') from err
        return None
    finally:
        transformers.logging.set_verbosity(level)


def _words_ids(tok, words: str, vocab: int, m: int) -> torch.Tensor | None:
    """Token ids (m,) of ``words`` (no special tokens), repeated or cut to m; None if they do not fit ``vocab``."""
    ids = tok(words, add_special_tokens=False)["input_ids"]
    if not ids or max(ids) >= vocab:
        return None
    reps = -(-m // len(ids))
    return torch.tensor((ids * reps)[:m], dtype=torch.long)  # (m,)


def vocab_ids(model: nn.Module, m: int, seed: int = VOCAB_SEED) -> torch.Tensor:
    """m token ids (m,) sampled without replacement (seeded) from the model's vocabulary.

    Skips the first min(SKIP_IDS, vocab // 10) ids (special, unused and byte tokens in BERT and
    Llama vocabularies) and the special ids the model config names (bos, eos, pad, ...).
    """
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    rows = model.get_input_embeddings().num_embeddings
    hi = min(rows, getattr(cfg, "vocab_size", None) or rows)
    special = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "cls_token_id", "unk_token_id",
                "mask_token_id", "decoder_start_token_id"):
        value = getattr(cfg, key, None)
        special.update(value if isinstance(value, (list, tuple)) else [value])
    pool = torch.tensor([i for i in range(min(SKIP_IDS, hi // 10), hi) if i not in special], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    pick = (torch.randperm(len(pool), generator=gen)[:m] if len(pool) >= m
            else torch.randint(len(pool), (m,), generator=gen))
    return pool[pick]  # (m,)


def init_ids(model: nn.Module, config, m: int) -> torch.Tensor:
    """The real token ids (m,) whose keys/values (prefix) or embeddings (prompt) start an adapter.

    ``config.init``: "text:<words>" (tokenizer required), "auto" (``DEFAULT_PHRASE`` with the
    model's tokenizer, else ``vocab_ids``) or "vocab" (``vocab_ids``). Not for "random".
    """
    vocab = model.get_input_embeddings().num_embeddings
    if config.init == "vocab":
        return vocab_ids(model, m)
    if config.init == "auto":
        found = _load_tokenizer(model, config, required=False)
        ids = _words_ids(found[0], DEFAULT_PHRASE, vocab, m) if found is not None else None
        return vocab_ids(model, m) if ids is None else ids
    if not config.init.startswith("text:"):
        raise ValueError(f"init={config.init!r} takes no token ids")
    tok, source = _load_tokenizer(model, config, required=True)
    ids = _words_ids(tok, config.init[5:].strip(), vocab, m)
    if ids is None:
        raise ValueError(f"the tokenizer {source!r} does not fit this model's vocabulary ({vocab} tokens)")
    return ids


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
    enc = model._modules[CONTAINER][name or model.__dict__["peftlab_active"]]
    before, enc.visible = enc.visible, visible
    try:
        yield
    finally:
        enc.visible = before


# -- inject / trainable / delete / merge hooks ----------------------------------------------
def _find_saves(model: nn.Module, keys: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    found = []
    for key in keys:
        hits = [(n, m) for n, m in walk(model) if n == key or n.endswith("." + key)]
        if not hits:
            raise ValueError(f"modules_to_save entry {key!r} matches no module of {type(model).__name__}: "
                             "use a module name such as 'classifier' or 'score' that exists in the model")
        found += hits
    return found


def add_saves(model: nn.Module, keys: tuple[str, ...], name: str, plan=None) -> None:
    """Wrap ``modules_to_save`` (shared with LoRA's wrapper) and add a trainable copy for ``name``."""
    for path, mod in plan if plan is not None else _find_saves(model, keys):
        wrapper = mod if isinstance(mod, ModulesToSaveWrapper) else ModulesToSaveWrapper(mod)
        wrapper.add_copy(name)
        if wrapper is not mod:
            replace_module(model, path, wrapper)


def mark_saves(model: nn.Module, name: str) -> None:
    for _, mod in walk(model):
        if isinstance(mod, ModulesToSaveWrapper) and name in mod.modules_to_save:
            mod.modules_to_save[name].requires_grad_(True)


def delete_saves(model: nn.Module, name: str) -> None:
    for path, mod in list(walk(model)):
        if isinstance(mod, ModulesToSaveWrapper) and name in mod.modules_to_save:
            mod.delete_copy(name)
            if not len(mod.modules_to_save):
                replace_module(model, path, mod.original_module)


def adapter_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, (torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype)


def _inject_prefix(model: nn.Module, config: PrefixConfig, name: str) -> None:
    m = config.num_virtual_tokens
    limit = position_limit(model)
    if limit and m >= limit:
        raise ValueError(f"PrefixConfig.num_virtual_tokens={m} reaches the model's limit of {limit} positions: "
                         "use a much shorter prefix (e.g. 16)")
    if config.projection and config.init != "random" and config.projection_hidden < m:
        raise ValueError(f"init={config.init!r} with projection needs projection_hidden >= num_virtual_tokens "
                         f"({config.projection_hidden} < {m}) for the MLP to reproduce real tokens' keys and values: "
                         f"raise projection_hidden to at least {m}, or use projection=False")
    sites, heads, head_dim = attention_sites(model)  # every check runs before the model changes
    plan = _find_saves(model, config.modules_to_save)
    device, dtype = adapter_dtype(model)
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
        mod.__dict__[_SITE] = (model, index)
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)


def _mark_prefix_trainable(model: nn.Module, config: PrefixConfig, name: str) -> None:
    model._modules[CONTAINER][name].requires_grad_(True)
    mark_saves(model, name)


def _delete_prefix(model: nn.Module, name: str) -> None:
    bank = model._modules[CONTAINER]
    del bank[name]
    delete_saves(model, name)
    if not len(bank):  # the last prefix adapter: put the model back as it was
        del model._modules[CONTAINER]
        for mod in model.modules():
            mod.__dict__.pop(_SITE, None)
        model.set_attn_implementation(model.__dict__.pop(_BEFORE, "eager"))


def _merge_prefix(model: nn.Module, name: str) -> None:
    model._modules[CONTAINER][name].fold()


def refuse_unload(model: nn.Module, name: str) -> None:
    kind = type(configs(model)[name]).__name__
    raise RuntimeError(f"adapter {name!r} is a {kind}: it adds keys/values or inputs, not weight updates, so "
                       f"unload() cannot merge it into the weights; remove it with peftlab.delete(model, {name!r})")


register_method(PrefixConfig, MethodHooks(_inject_prefix, _mark_prefix_trainable, _delete_prefix,
                                          merge=_merge_prefix, unload=refuse_unload))

from . import prefix_io as _prefix_io  # noqa: E402,F401  (registers save/load for prefix and prompt)
