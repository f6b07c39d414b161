"""Saving and loading LoRA adapters in HF peft's on-disk format.

A LoRA adapter (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", arXiv:2106.09685) is tiny next to its base model, so only the adapter
is written: ``adapter_config.json`` plus ``adapter_model.safetensors``.  The
layout is the one HF peft uses, so ``peft.PeftModel.from_pretrained(base, dir)``
reads what :func:`save_adapter` writes and :func:`load_adapter` reads what peft
writes:

* ``base_model.model.<module path>.lora_A.weight``  (r, in)
* ``base_model.model.<module path>.lora_B.weight``  (out, r)
* ``base_model.model.<module path>.<param>`` for each ``modules_to_save`` copy
  (peft drops the ``modules_to_save.<name>`` part when saving)
* ``base_model.model.<module path>.base_layer.bias`` etc. when biases are trained.

Only safetensors and JSON are ever read -- never pickle (``torch.load``). Loading checks
everything (keys, shapes, dtypes, finite values) before the model changes; saving replaces
only the adapter's own files, each atomically (``peftlab/atomic.py``).
Explained in notebooks/03_lora.ipynb.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import atomic
from .config import LoRAConfig
from .inject import configs, inject
from .lora import LoRALinear
from .targets import checked_plan, find_modules, walk
from .wrappers import ModulesToSaveWrapper

__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "read_adapter_json", "tensor_problem",
           "CONFIG_NAME", "WEIGHTS_NAME", "PEFTLAB_NAME"]

CONFIG_NAME = "adapter_config.json"
# peftlab's own record of an adapter (format version, name, full config, shapes) lives beside
# adapter_config.json, not inside it: HF peft warns about (and tells users to upgrade for) any
# key of adapter_config.json it does not know.
PEFTLAB_NAME = "peftlab_adapter.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's prefix: PeftModel.base_model (LoraModel).model
FORMAT_VERSION = 1

# -- other methods plug in here (peftlab/prefix_io.py: prefix and prompt tuning) ----------
_SAVERS: dict[type, Callable] = {}  # config class -> saver(model, name) -> (tensors, meta)
_LOADERS: dict[str, Callable] = {}  # config method -> loader(model, directory, name) -> model
_PEFT_TYPES = {"PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}


def register_io(config_cls: type, saver: Callable, loader: Callable) -> None:
    """Let save_adapter / load_adapter handle configs of ``config_cls`` with these functions."""
    _SAVERS[config_cls] = saver
    _LOADERS[config_cls.method] = loader


def _json_file(path: Path):
    """Parse one JSON file; a parse error names the file (adapter folders hold two JSON files)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise json.JSONDecodeError(f"{path} is not valid JSON: {exc.msg}", exc.doc, exc.pos) from None
    except UnicodeDecodeError:
        raise json.JSONDecodeError(f"{path} is not UTF-8 text", "", 0) from None


def read_adapter_json(directory: str | os.PathLike) -> dict:
    """``adapter_config.json`` of ``directory`` with peftlab's record (``peftlab_adapter.json``,
    when present) under the key ``"peftlab"``; raises ``json.JSONDecodeError`` (its message
    names the bad file) or ``OSError``."""
    d = Path(directory)
    raw = _json_file(d / CONFIG_NAME)
    if isinstance(raw, dict) and (d / PEFTLAB_NAME).is_file():
        raw["peftlab"] = _json_file(d / PEFTLAB_NAME)
    return raw


def _method_of(d: Path) -> str | None:
    """The peftlab method the adapter in ``d`` holds, if it is not LoRA's business."""
    try:
        raw = read_adapter_json(d)
        ours = raw.get("peftlab", {}).get("config", {}).get("method") if isinstance(raw.get("peftlab"), dict) else None
        return ours or _PEFT_TYPES.get(raw.get("peft_type"))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, OSError):
        return None  # the LoRA path reports the problem


def _bias_all_names(model: nn.Module, exclude: list[str], targets: list[str]) -> list[tuple[str, str]]:
    """(current name, name after injection) of every bias trained by bias="all"."""
    from .targets import base_parameters  # the base model's own biases, never another adapter's

    out = []
    for n, _ in base_parameters(model):
        if not n.endswith("bias") or "lora_" in n or ".original_module." in n or ".modules_to_save." in n:
            continue
        owner = n.rsplit(".", 1)[0] if "." in n else ""
        if any(owner == e or owner.startswith(e + ".") for e in exclude):
            continue
        out.append((n, f"{owner}.base_layer.bias" if owner in targets else n))
    return out


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under peft's checkpoint keys (live tensors, not copies)."""
    if name not in configs(model):
        raise ValueError(f"no adapter named {name!r} in the model: injected adapters are {list(configs(model))}")
    config = configs(model)[name]
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"adapter {name!r} is a {type(config).__name__}; only LoRA adapters can be saved so far")
    out: dict[str, torch.Tensor] = {}
    for path, mod in walk(model):
        if isinstance(mod, LoRALinear) and name in mod.lora_A:
            out[f"{PREFIX}{path}.lora_A.weight"] = mod.lora_A[name].weight
            out[f"{PREFIX}{path}.lora_B.weight"] = mod.lora_B[name].weight
            if config.bias == "lora_only" and mod.base_layer.bias is not None:
                out[f"{PREFIX}{path}.base_layer.bias"] = mod.base_layer.bias
        elif isinstance(mod, ModulesToSaveWrapper) and name in mod.modules_to_save:
            for k, v in mod.modules_to_save[name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.{k}"] = v
    if config.bias == "all":
        params = dict(model.named_parameters())
        for n, _ in _bias_all_names(model, [], []):
            out[PREFIX + n] = params[n]
    return out


def _task_type(model: nn.Module, config: LoRAConfig) -> str | None:
    cls = type(model).__name__
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    # peft adds "classifier"/"score" to modules_to_save for SEQ_CLS and then expects their tensors,
    # so only claim SEQ_CLS when the head is really saved
    if cls.endswith("ForSequenceClassification") and {"classifier", "score"} & set(config.modules_to_save):
        return "SEQ_CLS"
    return None


def _peft_config(model: nn.Module, config: LoRAConfig, name: str) -> dict:
    lora_layers = [(p, m) for p, m in walk(model) if isinstance(m, LoRALinear) and name in m.lora_A]
    targets = config.target_modules
    if targets == "all-linear":  # peft's "all-linear" excludes slightly different heads: be explicit
        targets = [p for p, _ in lora_layers]
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model, config),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "modules_to_save": list(config.modules_to_save) or None,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in lora_layers),
        "init_lora_weights": True if config.init == "kaiming" else config.init,
        "inference_mode": True,
        "peftlab": {"format_version": FORMAT_VERSION, "adapter_name": name, "config": config.to_dict()},
    }


# One id per save, written into the weights' safetensors metadata and into peftlab_adapter.json
# (renamed into place last): a folder whose two ids differ holds files of two saves, which only a
# kill in the middle of save_adapter's renames leaves behind (see peftlab/atomic.py).
SAVE_ID = "peftlab_save_id"
# temporary folders of earlier peftlab versions' save_adapter, removed like today's: ".<name>.tmp-*"
# (tempfile.mkdtemp) and ".<name>.old-<uuid hex>"
_LEGACY_TMP = (".tmp-", ".old-")


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter ``name`` to ``directory`` safely and return the directory path.

    Only the adapter's own files (``adapter_config.json``, ``adapter_model.safetensors``,
    ``peftlab_adapter.json``) are written; anything else in ``directory`` is kept. A new
    directory is built aside and renamed into place; over an existing adapter each file is
    written completely under a temporary name, flushed, and renamed over the old one, so an
    adapter is at the path at every moment, and an interrupted save puts the old files back
    (``peftlab.atomic.replace_files``). Modes follow the umask (0755 / 0644 typically).
    """
    saver = _SAVERS.get(type(configs(model).get(name)))
    if saver is not None:  # prefix / prompt tuning build their own files
        tensors, meta = saver(model, name)
    else:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model, name).items()}
        meta = _peft_config(model, configs(model)[name], name)
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory: choose a directory path for the adapter")
    meta = dict(meta)
    record = meta.pop("peftlab", None)  # peftlab's own record goes to its own file
    save_id = uuid.uuid4().hex
    metadata = {"format": "pt"}
    if record is not None:
        record = {**record, "save_id": save_id}
        metadata[SAVE_ID] = save_id

    def json_writer(content: dict) -> atomic.Writer:
        def write(path: Path) -> None:
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(content, fh, indent=2, sort_keys=True)
        return write

    # rename order: weights, then the peft config, then peftlab's record, which commits the save
    # (None removes a record a previous save of another kind left behind)
    files = {WEIGHTS_NAME: lambda path: save_file(tensors, str(path), metadata=metadata),
             CONFIG_NAME: json_writer(meta),
             PEFTLAB_NAME: json_writer(record) if record is not None else None}
    atomic.replace_files(target, files)
    # temporary folders a crashed save of this adapter left beside it (only now: before an old
    # version's save completed, its ".old-" folder may have been the only copy of the adapter)
    atomic.remove_stale(target.parent, tuple(f".{target.name}{t}" for t in (atomic.TMP_MARK, *_LEGACY_TMP)))
    return target


# HF peft initialisations that also rewrite the base layer's weight when the adapter is created:
# PiSSA, OLoRA, CorDA and LoRA-GA subtract the initial update (W <- W - scale * B0 A0), LoftQ
# replaces W by a quantised approximation. Their A and B only fit that modified base, so loaded
# onto the original weights they give wrong outputs. Matched as prefixes ("pissa_niter_16"), as peft does.
_BASE_REWRITING_INITS = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "lora_ga": "LoRA-GA",
                         "loftq": "LoftQ"}
# initialisations that only set lora_A / lora_B (which the saved tensors overwrite) and leave W alone
_PLAIN_INITS = {"gaussian", "eva", "orthogonal", "mica"}


def _check_init(path: Path, init) -> None:
    """Refuse an adapter whose ``init_lora_weights`` changed the base weights, or is unknown."""
    if init is None or isinstance(init, bool) or (isinstance(init, str) and init.lower() in _PLAIN_INITS):
        return
    where = f"{path}: init_lora_weights={init!r}"
    method = next((v for k, v in _BASE_REWRITING_INITS.items() if isinstance(init, str) and init.lower().startswith(k)),
                  None)
    if method == "LoftQ":
        raise ValueError(
            f"{where} (LoftQ) replaced the base model's weights by a quantised approximation when the adapter was "
            "created, so the adapter only fits that modified base, and peft has no conversion to a plain LoRA: load "
            "it with peft onto the LoftQ-initialised base, or merge it there (peft's merge_and_unload()) and save the "
            "full model")
    if method is not None:
        raise ValueError(
            f"{where} ({method}) rewrote the base model's weights when the adapter was created (W - scale * B0 A0 for "
            "the initial B0, A0), so the adapter only gives the right outputs on that modified base, while peftlab "
            "loads LoRA adapters onto the original base weights. Convert it with peft into a plain LoRA adapter "
            "(rank 2r) that needs no base change: peft_model.save_pretrained(out_dir, "
            "path_initial_model_for_weight_conversion=<the adapter saved right after initialisation, before "
            "training>), then load out_dir")
    raise ValueError(
        f"{where} is an initialisation peftlab does not know. Some (PiSSA, OLoRA, LoftQ...) rewrite the base weights, "
        "and such an adapter gives wrong outputs on the original base; if this one only initialises lora_A / lora_B, "
        "set init_lora_weights to true in adapter_config.json to load it")


def _read_config(d: Path) -> tuple[LoRAConfig, bool, str | list[str] | None]:
    """Parse the adapter's JSON -> (config, written_by_peftlab, peft's exclude_modules)."""
    path = d / CONFIG_NAME
    try:
        raw = read_adapter_json(d)
    except json.JSONDecodeError as exc:  # its message names the file: adapter_config.json or peftlab_adapter.json
        raise ValueError(f"{exc}: the adapter directory is corrupt, save it again") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}: save the adapter again")
    _check_init(path, raw.get("init_lora_weights", True))
    if isinstance(raw.get("peftlab"), dict) and "config" in raw["peftlab"]:
        return LoRAConfig.from_dict(raw["peftlab"]["config"]), True, None
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {raw.get('peft_type')!r}, but only 'LORA' adapters can be loaded here")
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform", "lora_bias",
                               "trainable_token_indices", "target_parameters") if raw.get(k)]
    if unsupported:
        raise ValueError(f"{path} uses peft features peftlab does not implement: {unsupported}")
    init = raw.get("init_lora_weights", True)
    targets = raw.get("target_modules")
    config = LoRAConfig(
        r=raw.get("r", 8),
        alpha=raw.get("lora_alpha", 8),
        dropout=raw.get("lora_dropout", 0.0),
        target_modules=targets if isinstance(targets, str) else tuple(sorted(targets or ())),
        modules_to_save=tuple(raw.get("modules_to_save") or ()),
        bias=raw.get("bias", "none"),
        use_rslora=bool(raw.get("use_rslora", False)),
        init="gaussian" if init == "gaussian" else "kaiming",
    )
    exclude = raw.get("exclude_modules") or None
    if exclude is not None and not (isinstance(exclude, str) or (
            isinstance(exclude, list) and all(isinstance(e, str) for e in exclude))):
        raise ValueError(f"{path}: exclude_modules must be a regex string or a list of module names, got {exclude!r}")
    return config, False, exclude


def _is_excluded(name: str, exclude: str | list[str]) -> bool:
    """HF peft's rule (``check_target_module_exists``): a string is a full-match regex on the
    module's dotted name, a list excludes a name that equals an entry or ends with "." + entry."""
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return any(name == e or name.endswith("." + e) for e in exclude)


def _without_excluded(model: nn.Module, config: LoRAConfig, exclude: str | list[str], path: Path) -> LoRAConfig:
    """``config`` with target_modules spelled out as the selected modules minus peft's exclude_modules."""
    plan = find_modules(model, config)
    selected = [n for n, _, _ in plan.targets + plan.unsupported]  # unsupported ones still raise in checked_plan
    kept = tuple(n for n in selected if not _is_excluded(n, exclude))
    if selected and not kept:
        raise ValueError(f"{path}: exclude_modules={exclude!r} excludes every module target_modules="
                         f"{config.target_modules!r} selects in this {type(model).__name__}, so the adapter adapts "
                         "nothing here: load it onto the base model it was trained on")
    return dataclasses.replace(config, target_modules=kept) if selected else config


def _expected(model: nn.Module, config: LoRAConfig, name: str) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Checkpoint keys the adapter must provide and optional (bias) keys, each with its shape."""
    plan = checked_plan(model, config, name)
    required: dict[str, tuple] = {}
    optional: dict[str, tuple] = {}
    for path, mod, _ in plan.targets:
        base = mod.base_layer if isinstance(mod, LoRALinear) else mod
        w = base.weight  # nn.Linear: (out, in); Conv1D: (in, out)
        fan_in, fan_out = (w.shape[1], w.shape[0]) if isinstance(base, nn.Linear) else (w.shape[0], w.shape[1])
        required[f"{PREFIX}{path}.lora_A.weight"] = (config.r, fan_in)
        required[f"{PREFIX}{path}.lora_B.weight"] = (fan_out, config.r)
        if config.bias == "lora_only" and base.bias is not None:
            optional[f"{PREFIX}{path}.base_layer.bias"] = tuple(base.bias.shape)
    for path, mod in plan.saves:
        src = mod.original_module if isinstance(mod, ModulesToSaveWrapper) else mod
        required.update({f"{PREFIX}{path}.{k}": tuple(v.shape) for k, v in src.state_dict().items()})
    if config.bias == "all":
        params = dict(model.named_parameters())
        saves = [p for p, _ in plan.saves]
        for now, later in _bias_all_names(model, saves, [p for p, _, _ in plan.targets]):
            optional[PREFIX + later] = tuple(params[now].shape)
    return required, optional


def _fmt(items: list[str], limit: int = 5) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def tensor_problem(tensor: torch.Tensor, like: torch.dtype | None = None) -> str | None:
    """Why ``tensor`` must not be copied into a tensor of dtype ``like``, or None if it may.

    ``like=None`` stands for "some floating-point parameter". A floating-point destination takes
    any floating-point dtype (peft keeps the adapters of fp16/bf16 models in fp32; the cast is the
    usual one) but no integer or bool tensor, whose values no save writes and a copy would cast
    silently. Any other destination needs exactly its own dtype. Floating values must be finite:
    NaN/inf come from a diverged run or a damaged file. Used for adapters and checkpoints alike.
    """
    want_float = like is None or like.is_floating_point
    if want_float and not tensor.is_floating_point():
        return (f"has dtype {tensor.dtype}, expected a floating-point dtype"
                + (f" (the model's is {like})" if like is not None else ""))
    if not want_float and tensor.dtype != like:
        return f"has dtype {tensor.dtype}, expected {like}"
    if tensor.is_floating_point():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            return f"contains NaN/inf ({bad} of {tensor.numel()} values)"
    return None


def _read_weights(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of ``d``'s weights file, or a ValueError naming it."""
    path = d / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}): the file is corrupt, save the adapter again") from exc


def _check_weights(model: nn.Module, d: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Refuse, for every method, tensors that are not what a save writes, and files of two saves."""
    # a saved tensor that copies one of the model's own (modules_to_save) must keep its dtype when
    # that is not floating-point (an integer buffer); every other tensor must be floating-point
    own = {n: t.dtype for n, t in model.state_dict(keep_vars=True).items()}

    def like(key: str) -> torch.dtype | None:
        name = key.removeprefix(PREFIX).removeprefix("modules_to_save.")  # peft's / prefix_io's layouts
        owner, _, leaf = name.rpartition(".")
        return own.get(name, own.get(f"{owner}.original_module.{leaf}"))  # the module may be wrapped already

    problems = [f"tensor {k!r} {p}" for k, v in tensors.items() if (p := tensor_problem(v, like(k))) is not None]
    if problems:
        raise ValueError(f"{d / WEIGHTS_NAME}: {_fmt(problems)}; refusing to load it (a damaged file, or one saved "
                         "from a diverged run): save the adapter again or load an earlier one")
    try:
        record = json.loads((d / PEFTLAB_NAME).read_text(encoding="utf-8")) if (d / PEFTLAB_NAME).is_file() else None
    except (UnicodeDecodeError, json.JSONDecodeError, OSError):
        return  # the config reader reports a broken record
    # (a weights file without an id was rewritten by another tool, or by an older peftlab: nothing to compare)
    if isinstance(record, dict) and SAVE_ID in metadata and metadata[SAVE_ID] != record.get("save_id"):
        raise ValueError(f"{d}: {WEIGHTS_NAME} and {PEFTLAB_NAME} come from two different saves (a save_adapter() "
                         "into this folder was interrupted between its renames): save the adapter again")


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> nn.Module:
    """Inject adapter ``name`` from a peftlab- or peft-written directory and load its tensors.

    Everything (files, config, keys, shapes, dtypes, finite values) is checked before the
    model is changed; on any error the model is left exactly as it was.  Returns ``model``.
    HF peft adapters whose ``init_lora_weights`` rewrote the base weights (PiSSA, OLoRA,
    CorDA, LoRA-GA, LoftQ) are refused, with how to convert them; ``exclude_modules`` is honoured.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"adapter directory {d} does not exist: pass the folder save_adapter() wrote")
    if not (d / WEIGHTS_NAME).is_file():
        if (d / "adapter_model.bin").exists():
            raise ValueError(
                f"{d} holds adapter_model.bin, a pickle file, which peftlab refuses to load (pickle can run code): "
                "re-save it as safetensors, e.g. PeftModel.save_pretrained(dir, safe_serialization=True)"
            )
        raise FileNotFoundError(f"{d / WEIGHTS_NAME} is missing: the adapter directory is incomplete")
    if not (d / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{d / CONFIG_NAME} is missing: the adapter directory is incomplete")
    tensors, metadata = _read_weights(d)
    _check_weights(model, d, tensors, metadata)
    loader = _LOADERS.get(_method_of(d))
    if loader is not None:  # prefix / prompt tuning read their own files
        return loader(model, d, name)
    config, ours, exclude = _read_config(d)
    if not ours and config.modules_to_save:  # peft lists heads (e.g. "score") that may not exist in this model
        present = tuple(k for k in config.modules_to_save if k not in find_modules(model, config).unmatched_saves)
        config = dataclasses.replace(config, modules_to_save=present)
    if exclude is not None:
        config = _without_excluded(model, config, exclude, d / CONFIG_NAME)
    if name in configs(model):
        raise ValueError(f"an adapter named {name!r} is already injected: load under another name or delete it first")
    try:
        required, optional = _expected(model, config, name)
    except ValueError as exc:
        raise ValueError(f"adapter in {d} does not fit this {type(model).__name__} (wrong base model?): {exc}") from exc
    if config.bias == "all":  # peft also writes the bias of the frozen original / copy under wrapper paths;
        # the copy's bias is already present as "<path>.bias", so these duplicates are dropped
        tensors = {k: v for k, v in tensors.items()
                   if not (k.endswith("bias") and (".original_module." in k or ".modules_to_save." in k))}
    missing = [k for k in required if k not in tensors]
    unexpected = [k for k in tensors if k not in required and k not in optional]
    shapes = {**required, **optional}
    wrong = [f"{k}: file {tuple(v.shape)} vs model {shapes[k]}" for k, v in tensors.items()
             if k in shapes and tuple(v.shape) != shapes[k]]
    if missing or unexpected or wrong:
        parts = [f"shape mismatch: {_fmt(wrong)}" if wrong else "", f"missing keys: {_fmt(missing)}" if missing else "",
                 f"unexpected keys: {_fmt(unexpected)}" if unexpected else ""]
        raise ValueError(
            f"adapter in {d} does not fit this {type(model).__name__} -- " + " | ".join(p for p in parts if p)
            + ": load it onto the base model it was trained on"
        )
    inject(model, config, name)
    live = adapter_state_dict(model, name)
    with torch.no_grad():
        for k, v in tensors.items():
            live[k].copy_(v)
    return model
