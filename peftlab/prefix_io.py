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
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from . import prefix, prompt
from .config import PrefixConfig, PromptTuningConfig
from .inject import configs, inject
from .io import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, read_adapter_json, register_io
from .targets import walk
from .wrappers import ModulesToSaveWrapper

__all__ = ["SAVES_PREFIX", "TENSOR"]

TENSOR = "prompt_embeddings"  # HF peft's key for prompt-learning adapters
SAVES_PREFIX = "modules_to_save."


def _is_causal_lm(model: nn.Module) -> bool:
    cls = type(model).__name__
    return cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel")


def _copies(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    out = {}
    for path, mod in walk(model):
        if isinstance(mod, ModulesToSaveWrapper) and name in mod.modules_to_save:
            for k, v in mod.modules_to_save[name].state_dict().items():
                out[f"{SAVES_PREFIX}{path}.{k}"] = v
    return out


def _meta(model: nn.Module, config, name: str, shapes: dict) -> dict:
    return {"peftlab": {"format_version": FORMAT_VERSION, "adapter_name": name, "config": config.to_dict(),
                        **shapes},
            "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None}


def _save_prefix(model: nn.Module, name: str) -> tuple[dict, dict]:
    config, enc = configs(model)[name], model._modules[prefix.CONTAINER][name]
    tensors = {TENSOR: enc.flat(), **_copies(model, name)}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    L, K, hd, m = enc.num_layers, enc.kv_heads, enc.head_dim, enc.num_virtual_tokens
    meta = _meta(model, config, name, {"num_layers": L, "kv_heads": K, "head_dim": hd,
                                       "layout": "prompt_embeddings (m, layers * 2 * kv_heads * head_dim): "
                                                 "layer-major, key then value"})
    if _is_causal_lm(model) and not config.modules_to_save:  # HF peft reads this directory too
        meta.update(peft_type="PREFIX_TUNING", task_type="CAUSAL_LM", num_virtual_tokens=m, token_dim=K * hd,
                    num_attention_heads=K, num_layers=L, encoder_hidden_size=K * hd, prefix_projection=False,
                    num_transformer_submodules=1, inference_mode=True, init_weights=None, modules_to_save=None)
    else:
        meta["format"] = "peftlab-prefix"
    return tensors, meta


def _save_prompt(model: nn.Module, name: str) -> tuple[dict, dict]:
    config, enc = configs(model)[name], model._modules[prompt.CONTAINER][name]
    tensors = {TENSOR: enc.prompt_embedding, **_copies(model, name)}
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


def _read(d: Path, cls: type, peft_type: str) -> tuple[object, dict, dict[str, torch.Tensor]]:
    """(config to inject, raw JSON, tensors), read and checked without touching the model."""
    try:
        raw = read_adapter_json(d)
        tensors = load_file(str(d / WEIGHTS_NAME), device="cpu")
    except (UnicodeDecodeError, json.JSONDecodeError, SafetensorError, OSError) as exc:
        raise ValueError(f"{d} cannot be read ({exc}): the adapter directory is corrupt, save it again") from exc
    if isinstance(raw.get("peftlab"), dict):
        config = cls.from_dict(raw["peftlab"]["config"])
    elif raw.get("peft_type") == peft_type and raw.get("num_transformer_submodules", 1) == 1:
        config = cls(num_virtual_tokens=int(raw["num_virtual_tokens"]))
    else:
        raise ValueError(f"{d / CONFIG_NAME} is not a {cls.__name__} adapter peftlab can read "
                         f"(peft_type={raw.get('peft_type')!r})")
    if TENSOR not in tensors:
        raise ValueError(f"{d / WEIGHTS_NAME} has no {TENSOR!r} tensor: save the adapter again")
    changes = {"init": "random", **({"projection": False} if cls is PrefixConfig else {})}
    return dataclasses.replace(config, **changes), raw, tensors


def _check_copies(model: nn.Module, config, tensors: dict, d: Path) -> None:
    expected = {}
    for path, mod in prefix._find_saves(model, config.modules_to_save):
        src = mod.original_module if isinstance(mod, ModulesToSaveWrapper) else mod
        expected.update({f"{SAVES_PREFIX}{path}.{k}": tuple(v.shape) for k, v in src.state_dict().items()})
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
        for path, mod in walk(model):
            if isinstance(mod, ModulesToSaveWrapper) and name in mod.modules_to_save:
                live = mod.modules_to_save[name].state_dict()
                for k, v in live.items():
                    v.copy_(tensors[f"{SAVES_PREFIX}{path}.{k}"])
    return model


def _load_prefix(model: nn.Module, d: Path, name: str) -> nn.Module:
    config, raw, tensors = _read(d, PrefixConfig, "PREFIX_TUNING")
    sites, K, hd = prefix.attention_sites(model)
    want = (config.num_virtual_tokens, len(sites) * 2 * K * hd)
    got = tuple(tensors[TENSOR].shape)
    if got != want:
        saved = raw.get("peftlab", {})
        was = (f" (saved for {saved['num_layers']} layers x {saved['kv_heads']} kv heads x head_dim "
               f"{saved['head_dim']})" if "num_layers" in saved else "")
        raise ValueError(f"prefix adapter in {d} has shape {got}{was}, but this {type(model).__name__} needs {want} = "
                         f"(m, {len(sites)} layers x 2 x {K} kv heads x {hd}): load it onto the model it was "
                         "trained for")
    return _load(model, d, name, config, tensors,
                 lambda mdl, n: mdl._modules[prefix.CONTAINER][n].prefix_keys_values)


def _load_prompt(model: nn.Module, d: Path, name: str) -> nn.Module:
    config, _, tensors = _read(d, PromptTuningConfig, "PROMPT_TUNING")
    want = (config.num_virtual_tokens, model.get_input_embeddings().weight.shape[1])
    if tuple(tensors[TENSOR].shape) != want:
        raise ValueError(f"prompt adapter in {d} has shape {tuple(tensors[TENSOR].shape)}, but this "
                         f"{type(model).__name__} needs {want} = (m, hidden size): load it onto the model it was "
                         "trained for")
    return _load(model, d, name, config, tensors,
                 lambda mdl, n: mdl._modules[prompt.CONTAINER][n].prompt_embedding)


register_io(PrefixConfig, _save_prefix, _load_prefix)
register_io(PromptTuningConfig, _save_prompt, _load_prompt)
