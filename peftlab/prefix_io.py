"""Saving and loading prefix-tuning and prompt-tuning adapters.

Both write the two files ``peftlab.save_adapter`` always writes (``adapter_config.json``
and ``adapter_model.safetensors``; never pickle) and are read back by
``peftlab.load_adapter``. The safetensors file holds:

* ``prompt_embeddings``: prefix-tuning (Li & Liang 2021): (m, L * 2 * kv_heads * head_dim),
  per virtual token layer-major, key then value, heads, head_dim (the MLP, if any, is
  folded first); prompt tuning (Lester et al. 2021): (m, d).
* ``modules_to_save.<module path>.<param>``: the trained copies of e.g. the classifier.

For causal LMs without ``modules_to_save`` the JSON is also a valid HF peft config
(``PREFIX_TUNING`` / ``PROMPT_TUNING``), so ``peft.PeftModel.from_pretrained`` loads the
directory; otherwise (encoders, HF peft cannot run prefix-tuning on them under
transformers 5) the JSON says ``"format": "peftlab-prefix"`` / ``"peftlab-prompt"``.
Either way ``peftlab_adapter.json`` holds the format version, the adapter name, the peftlab
config and the shapes. Explained in notebooks/04_prefix_tuning.ipynb, section "Saving".

Positions. peftlab prepends the prefix inside attention and numbers the T real tokens 0..T-1,
as the base model does; HF peft hands the prefix over as a ``past_key_values`` cache of length
m, so the model numbers the real tokens m..m+T-1. ``peftlab_adapter.json`` records which
numbering the file's prefix belongs to under ``"input_positions"``: ``"from_0"`` (peftlab's;
files written before the key existed) or ``"from_m"`` (HF peft's; also assumed for a folder
HF peft wrote).

* Rotary models (Llama-style): the conversion is exact. With RoPE, R_p the rotation of
  position p and R_a^T R_b = R_{b-a}, a query of real token t meets a prefix key P as
  (R_t q) . P in peftlab and (R_{m+t} q) . P' in HF peft, so P' = R_m P gives the same
  scores. A file HF peft can read therefore holds every prefix key turned by +m positions
  (``"from_m"``), and loading a ``"from_m"`` file turns the keys back by -m; values carry no
  position and are stored as they are. The rotation is the model's own: cos/sin from its
  rotary module at position +m or -m (divided by sqrt(cos^2 + sin^2), so rope types that
  scale both by an attention factor still give a pure rotation), applied in float64 by the
  ``apply_rotary_pos_emb`` of its attention file (rotate-half convention, partial rotary,
  head_dim). A saved-and-loaded prefix therefore equals the trained one to float32 rounding
  (~1e-7), not bit for bit. A rotary model this does not mirror (several rotary modules, a
  different ``apply_rotary_pos_emb``) is treated like an absolute-position one.
* Absolute-position models (GPT-2): no conversion exists. The prefix keys carry no position
  in either library, but peftlab adds position embeddings 0..T-1 to the input and HF peft
  m..m+T-1, and no change to the file can undo that. The file is saved ``"from_0"``, as it
  is, with a warning: HF peft reproduces peftlab only if its forward sees the input at
  0..T-1 (peft 0.21 adds m to the ``position_ids`` it is given, so pass
  ``arange(-m, T - m)``). Loading an HF peft GPT-2 prefix warns the other way: peftlab
  reproduces HF peft with ``position_ids = arange(m, m + T)``.
* Encoders and adapters with ``modules_to_save`` (``"format": "peftlab-prefix"``, a file HF
  peft cannot read) are always ``"from_0"`` and saved as they are: load(save(x)) is exact.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import attention, prefix, prompt
from .config import PrefixConfig, PromptTuningConfig
from .inject import inject
from .io import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, read_adapter_json
from .registry import MethodHooks, configs, under
from .wrappers import SAVES_PREFIX, find_saves, saved_copies, saved_shapes

__all__ = ["PREFIX", "PROMPT", "SAVES_PREFIX", "TENSOR", "POSITIONS", "FROM_0", "FROM_M"]

TENSOR = "prompt_embeddings"  # HF peft's key for prompt-learning adapters
POSITIONS = "input_positions"  # peftlab_adapter.json: how the real tokens behind the saved prefix are numbered
FROM_0 = "from_0"  # 0..T-1, peftlab's numbering (and that of every file written before POSITIONS existed)
FROM_M = "from_m"  # m..m+T-1, HF peft's numbering: rotary prefix keys are stored turned by +m positions


def _is_causal_lm(model: nn.Module) -> bool:
    cls = type(model).__name__
    return cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel")


def _meta(model: nn.Module, config, name: str, shapes: dict) -> dict:
    return {"peftlab": {"format_version": FORMAT_VERSION, "adapter_name": name, "config": config.to_dict(),
                        **shapes},
            "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None}


# -- positions: peftlab numbers the real tokens 0..T-1, HF peft m..m+T-1 ---------------------
def _model_rope(model: nn.Module, site: nn.Module) -> tuple[nn.Module, Callable] | str:
    """(rotary module, ``apply_rotary_pos_emb`` of ``site``'s file) for ``_turn_keys``, or why there is none.

    Mirrored: one rotary module called as ``(x, position_ids) -> (cos, sin)`` and an
    ``apply_rotary_pos_emb(q, k, cos, sin, ...)`` next to the attention class (Llama, Mistral, Qwen2,
    Phi-3, ...). Anything else (absolute positions, rotary modules per layer type, ...) is a reason string.
    """
    cls = type(model).__name__
    if not prefix.rotary(model):
        return f"{cls} encodes positions with learned absolute embeddings, which no change to the prefix can shift"
    rotaries = [mod for mod in model.modules() if type(mod).__name__.endswith("RotaryEmbedding")]
    apply = getattr(sys.modules.get(type(site).__module__), "apply_rotary_pos_emb", None)
    unknown = f"{cls}'s rotary embedding is not the kind peftlab mirrors (one rotary module, apply_rotary_pos_emb)"
    if len(rotaries) != 1 or not callable(apply):
        return unknown
    needed = [p.name for p in inspect.signature(rotaries[0].forward).parameters.values() if p.default is p.empty]
    if list(inspect.signature(apply).parameters)[:4] != ["q", "k", "cos", "sin"] or needed != ["x", "position_ids"]:
        return unknown
    return rotaries[0], apply


def _turn_keys(rope: tuple[nn.Module, Callable], flat: torch.Tensor, num_layers: int, kv_heads: int,
               shift: int) -> torch.Tensor:
    """``flat`` (m, L * 2 * K * hd) with every prefix key rotated by ``shift`` positions; values unchanged.

    cos/sin are the model's own for position ``shift`` (its rotary module, divided by
    sqrt(cos^2 + sin^2) to drop any attention scaling), applied by its own ``apply_rotary_pos_emb``
    in float64. Turning by +m then -m gives ``flat`` back to float64 rounding (a float32 file adds its own).
    """
    rotary, apply = rope
    m = flat.shape[0]
    device = next(iter(rotary.buffers()), flat).device
    probe = torch.zeros(1, 1, 1, dtype=torch.float32, device=device)  # the module reads only its device and dtype
    with torch.no_grad():
        cos, sin = rotary(probe, torch.tensor([[shift]], device=device))  # (1, 1, rotary_dim) each
        cos, sin = cos.to(flat.device, torch.float64), sin.to(flat.device, torch.float64)
        norm = (cos.square() + sin.square()).sqrt()  # the attention factor (1.0 for rope_type "default")
        kv = flat.detach().to(torch.float64).reshape(m, num_layers, 2, kv_heads, -1)  # (m, L, 2, K, hd)
        keys = kv[:, :, 0].permute(1, 2, 0, 3)  # (L, K, m, hd): layers in the batch slot
        turned = apply(keys, keys, cos / norm, sin / norm)[1]  # (L, K, m, hd); cos/sin broadcast as (1, 1, 1, dim)
        kv = torch.stack([turned.permute(2, 0, 1, 3), kv[:, :, 1]], dim=2)  # (m, L, 2, K, hd)
    return kv.reshape(m, -1).to(flat.dtype)  # (m, L * 2 * K * hd)


def _position_warning(reason: str, m: int, saving: bool) -> None:
    """Warn that HF peft and peftlab read this prefix with the real tokens at different positions."""
    if saving:  # peft (0.21) adds m to the position_ids it is given: -m..T-m-1 become 0..T-1
        advice = ("so peft.PeftModel.from_pretrained on this folder gives different logits from peftlab unless "
                  "peft's forward sees the input at 0..T-1: peft adds m to the position_ids it is given, so pass "
                  f"position_ids=torch.arange(-{m}, T - {m})[None]")
    else:
        advice = ("so this prefix, which HF peft trained with the real tokens at m..m+T-1, gives HF peft's logits "
                  f"in peftlab only with position_ids=torch.arange({m}, {m} + T)[None]")
    warnings.warn(f"prefix positions differ between peftlab and HF peft and cannot be converted: {reason}. peftlab "
                  f"numbers the T real tokens 0..T-1, HF peft {m}..{m}+T-1 (its cache holds the m={m} virtual "
                  f"tokens), {advice}.", UserWarning, stacklevel=4)


def _save_prefix(model: nn.Module, name: str) -> tuple[dict, dict]:
    config, enc = configs(model)[name], model._modules[prefix.CONTAINER][name]
    L, K, hd, m = enc.num_layers, enc.kv_heads, enc.head_dim, enc.num_virtual_tokens
    flat, positions = enc.flat().detach(), FROM_0  # (m, L * 2 * K * hd)
    for_peft = _is_causal_lm(model) and not config.modules_to_save
    if for_peft:  # HF peft reads this directory too: give it the prefix for real tokens at m..m+T-1
        site = next(mod for mod in model.modules() if prefix.SITE_KEY in mod.__dict__)
        rope = _model_rope(model, site)
        if isinstance(rope, str):
            _position_warning(rope, m, saving=True)
        else:
            flat, positions = _turn_keys(rope, flat, L, K, +m), FROM_M
    tensors = {TENSOR: flat, **saved_copies(model, name)}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = _meta(model, config, name, {"num_layers": L, "kv_heads": K, "head_dim": hd, POSITIONS: positions,
                                       "layout": "prompt_embeddings (m, layers * 2 * kv_heads * head_dim): "
                                                 "layer-major, key then value"})
    if for_peft:
        meta.update(peft_type="PREFIX_TUNING", task_type="CAUSAL_LM", num_virtual_tokens=m, token_dim=K * hd,
                    num_attention_heads=K, num_layers=L, encoder_hidden_size=K * hd, prefix_projection=False,
                    num_transformer_submodules=1, inference_mode=True, init_weights=None, modules_to_save=None)
    else:
        meta["format"] = "peftlab-prefix"
    return tensors, meta


def _save_prompt(model: nn.Module, name: str) -> tuple[dict, dict]:
    config, enc = configs(model)[name], model._modules[prompt.CONTAINER][name]
    tensors = {TENSOR: enc.prompt_embedding, **saved_copies(model, name)}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    m, d = enc.prompt_embedding.shape
    meta = _meta(model, config, name, {"hidden_size": d, "layout": "prompt_embeddings (m, hidden_size)"})
    if _is_causal_lm(model) and not config.modules_to_save:
        c = model.config
        meta.update(peft_type="PROMPT_TUNING", task_type="CAUSAL_LM", num_virtual_tokens=m, token_dim=d,
                    num_transformer_submodules=1, num_attention_heads=c.num_attention_heads,
                    num_layers=c.num_hidden_layers, prompt_tuning_init="RANDOM", inference_mode=True,
                    modules_to_save=None)
    else:
        meta["format"] = "peftlab-prompt"
    return tensors, meta


def _read(d: Path, cls: type, peft_type: str) -> tuple[object, dict]:
    """(config to inject, raw JSON), read and checked without touching the model."""
    try:
        raw = read_adapter_json(d)
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as exc:
        raise ValueError(f"{d} cannot be read ({exc}): the adapter directory is corrupt, save it again") from exc
    if isinstance(raw.get("peftlab"), dict):
        config = cls.from_dict(raw["peftlab"]["config"])
    elif raw.get("peft_type") == peft_type and raw.get("num_transformer_submodules", 1) == 1:
        config = cls(num_virtual_tokens=int(raw["num_virtual_tokens"]))
    else:
        raise ValueError(f"{d / CONFIG_NAME} is not a {cls.__name__} adapter peftlab can read "
                         f"(peft_type={raw.get('peft_type')!r})")
    changes = {"init": "random", **({"projection": False} if cls is PrefixConfig else {})}
    return dataclasses.replace(config, **changes), raw


def _check_tensor(d: Path, tensors: dict) -> None:
    if TENSOR not in tensors:
        raise ValueError(f"{d / WEIGHTS_NAME} has no {TENSOR!r} tensor: save the adapter again")


def _check_copies(model: nn.Module, config, tensors: dict, d: Path) -> None:
    expected = saved_shapes(find_saves(model, config.modules_to_save))
    given = {k: tuple(v.shape) for k, v in tensors.items() if k != TENSOR}
    if given != expected:
        wrong = sorted(set(given.items()) ^ set(expected.items()))[:4]
        raise ValueError(f"adapter in {d} does not fit this {type(model).__name__}: modules_to_save tensors "
                         f"differ ({wrong}): load it onto the model it was trained for")


def _load(model: nn.Module, d: Path, name: str, config, tensors: dict, target) -> nn.Module:
    _check_copies(model, config, tensors, d)
    if name in configs(model):
        raise ValueError(f"an adapter named {name!r} is already injected: load under another name or delete it first")
    inject(model, config, name)
    with torch.no_grad():
        target(model, name).copy_(tensors[TENSOR])
        for key, live in saved_copies(model, name).items():
            live.copy_(tensors[key])
    return model


def _load_prefix(model: nn.Module, d: Path, name: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    config, raw = _read(d, PrefixConfig, "PREFIX_TUNING")
    _check_tensor(d, tensors)
    sites, K, hd = attention.attention_sites(model)
    want = (config.num_virtual_tokens, len(sites) * 2 * K * hd)
    got = tuple(tensors[TENSOR].shape)
    if got != want:
        saved = raw.get("peftlab", {})
        was = (f" (saved for {saved['num_layers']} layers x {saved['kv_heads']} kv heads x head_dim "
               f"{saved['head_dim']})" if "num_layers" in saved else "")
        raise ValueError(f"prefix adapter in {d} has shape {got}{was}, but this {type(model).__name__} needs {want} = "
                         f"(m, {len(sites)} layers x 2 x {K} kv heads x {hd}): load it onto the model it was "
                         "trained for")
    record = raw.get("peftlab")
    positions = record.get(POSITIONS, FROM_0) if isinstance(record, dict) else FROM_M  # no record: HF peft wrote it
    if positions not in (FROM_0, FROM_M):
        raise ValueError(f"{d} says {POSITIONS}={positions!r}; this peftlab reads {FROM_0!r} or {FROM_M!r}: "
                         "upgrade peftlab or save the adapter again")
    if positions == FROM_M:  # back to peftlab's numbering: keys turned by -m
        rope = _model_rope(model, sites[0])
        if isinstance(rope, str):
            _position_warning(rope, want[0], saving=False)
        else:
            tensors = {**tensors, TENSOR: _turn_keys(rope, tensors[TENSOR], len(sites), K, -want[0])}
    return _load(model, d, name, config, tensors,
                 lambda mdl, n: mdl._modules[prefix.CONTAINER][n].prefix_keys_values)


def _load_prompt(model: nn.Module, d: Path, name: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    config, _ = _read(d, PromptTuningConfig, "PROMPT_TUNING")
    _check_tensor(d, tensors)
    want = (config.num_virtual_tokens, model.get_input_embeddings().weight.shape[1])
    if tuple(tensors[TENSOR].shape) != want:
        raise ValueError(f"prompt adapter in {d} has shape {tuple(tensors[TENSOR].shape)}, but this "
                         f"{type(model).__name__} needs {want} = (m, hidden size): load it onto the model it was "
                         "trained for")
    return _load(model, d, name, config, tensors,
                 lambda mdl, n: mdl._modules[prompt.CONTAINER][n].prompt_embedding)


# -- the two methods' records (peftlab.registry) --------------------------------------------
PREFIX = MethodHooks(method="prefix", config=PrefixConfig, inject=prefix.inject_prefix,
                     mark_trainable=prefix.mark_prefix_trainable, delete=prefix.delete_prefix, save=_save_prefix,
                     load=_load_prefix, owns=under(prefix.CONTAINER), merge=prefix.merge_prefix,
                     unload=prefix.refuse_unload, peft_type="PREFIX_TUNING")
PROMPT = MethodHooks(method="prompt", config=PromptTuningConfig, inject=prompt.inject_prompt,
                     mark_trainable=prompt.mark_prompt_trainable, delete=prompt.delete_prompt, save=_save_prompt,
                     load=_load_prompt, owns=under(prompt.CONTAINER), merge=prompt.merge_prompt,
                     unload=prefix.refuse_unload, peft_type="PROMPT_TUNING")
