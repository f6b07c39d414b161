"""IA³: learned vectors that rescale the keys, the values and the feed-forward activations.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (arXiv:2205.05638), section 3.3. For a linear layer y = W x + b,
W (out, in), IA³ learns one vector per adapted layer:

* key and value projections (an "output" layer): y' = l ⊙ (W x + b), l (out,), so the keys
  and values are rescaled channel by channel; merged: W' = diag(l) W (rows), b' = l ⊙ b;
* the feed-forward output projection (a "feedforward" layer, BERT ``output.dense``, Llama
  ``down_proj``): y' = W (l ⊙ x) + b, l (in,), so the activation f(W_1 h) that enters it is
  rescaled; merged: W' = W diag(l) (columns), b unchanged.

Every l starts at ones, so the adapted model equals the base model exactly at init. An
adapter adds d_out parameters per output layer and d_in per feed-forward layer (BERT:
3d + d_ff per transformer layer, see ``DEFAULTS``; Llama: 2 n_kv d_head + d_ff).

Numerics, layout and files follow HF peft's ``tuners/ia3`` (peft is the reference):
:class:`IA3Linear` wraps an ``nn.Linear`` or GPT-2 ``Conv1D`` and keeps ``ia3_l``
(an ``nn.ParameterDict``, name -> (out, 1) or (1, in)), so every IA³ parameter name holds
``ia3_l``. Target modules match as for LoRA (``peftlab.targets``: a list entry equals the
dotted name or is a dotted suffix of it; a string is a full-match regex); a target is a
feed-forward layer when its name ends with a ``feedforward_modules`` entry (peft's rule, plain
``str.endswith``) or fully matches it as a regex. Beware: BERT's default entry
``"output.dense"`` also matches ``attention.output.dense`` (peft scales both on their input).

Merging is explicit (``peftlab.merge``) and exact to rounding; ``peftlab.unmerge`` puts back
a copy of the pre-merge weight and bias kept while merged (one copy of each adapted weight:
exact, unlike dividing by l, which peft does and which fails where l = 0).

Files (``peftlab.save_adapter``): HF peft's, ``adapter_config.json`` (``peft_type: "IA3"``)
and ``adapter_model.safetensors`` with keys ``base_model.model.<module path>.ia3_l`` and
``base_model.model.<module path>.<param>`` for the ``modules_to_save`` copies, so
``peft.PeftModel.from_pretrained`` reads what peftlab writes and ``peftlab.load_adapter``
reads what peft writes. Explained in notebooks/06_qlora_dora_ia3.ipynb.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .config import AdapterConfigBase
from .inject import ExplainReport, ExplainRow, inject
from .io import (CONFIG_NAME, FORMAT_VERSION, PEFT_PREFIX as PREFIX, fmt_list, peft_task_type,
                 read_adapter_config)
from .lora import Conv1D, linear_shape
from .registry import MethodHooks, configs
from .targets import HEAD_NAMES, base_parameters, linear_suffixes, replace_module, walk
from .tree import AdapterLayer
from .wrappers import (ModulesToSaveWrapper, adapter_dtype, add_saves, delete_saves, find_saves, mark_saves,
                       saved_copies, saved_shapes)

__all__ = ["IA3Config", "IA3Linear", "DEFAULTS", "ia3_sites", "ia3_parameters", "HOOKS"]

# model_type -> (target_modules, feedforward_modules): HF peft's defaults
# (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING)
DEFAULTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    "roberta": (("key", "value", "output.dense"), ("output.dense",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),  # c_attn is q, k and v in one Conv1D: q is scaled too
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
}
LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


@dataclass
class IA3Config(AdapterConfigBase):
    """IA³ (Liu et al. 2022): y' = l ⊙ y on ``target_modules``, y' = W (l ⊙ x) + b on ``feedforward_modules``.

    ``None`` takes the model type's defaults (``DEFAULTS``, HF peft's) at inject time; with
    ``target_modules`` given and ``feedforward_modules=None``, the default feed-forward entries
    that are also listed in ``target_modules`` (none for a model type without defaults: pass
    ``feedforward_modules=()`` to say so). Every feed-forward entry must also be a target, as
    HF peft requires.
    """

    method: ClassVar[str] = "ia3"

    target_modules: tuple[str, ...] | str | None = None  # k/v and FFN-output layers; None: DEFAULTS[model_type]
    feedforward_modules: tuple[str, ...] | str | None = None  # scaled on their input (d_in params), others on output
    modules_to_save: tuple[str, ...] = ()  # fully trained + saved modules, e.g. ("classifier",)

    def __post_init__(self) -> None:
        self.target_modules = self._names("target_modules", self.target_modules, empty_ok=False)
        self.feedforward_modules = self._names("feedforward_modules", self.feedforward_modules, empty_ok=True)
        v = self.modules_to_save
        if isinstance(v, str) or not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x for x in v):
            self._fail("modules_to_save", v, "a list/tuple of module names", 'e.g. ("classifier",)')
        self.modules_to_save = tuple(dict.fromkeys(v))
        _check_subset(self.target_modules, self.feedforward_modules, "")

    def _names(self, field: str, value: Any, empty_ok: bool) -> tuple[str, ...] | str | None:
        example = '["key", "value", "output.dense"]' if field == "target_modules" else '["output.dense"]'
        if value is None:
            return None
        if isinstance(value, str):
            if value == "all-linear":
                self._fail(field, value, "a list of module names or a regex",
                           f"IA³ scales keys, values and feed-forward activations, not every linear layer: "
                           f"name them, e.g. {example}, or leave None for the model type's defaults")
            try:
                re.compile(value)
            except re.error as exc:
                self._fail(field, value, "a valid regular expression", f"fix the pattern ({exc})")
            if not value:
                self._fail(field, value, "non-empty", f"use e.g. {example}")
            return value
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            self._fail(field, value, "None, a regex or a list/tuple of non-empty module names", f"use e.g. {example}")
        if not value and not empty_ok:
            self._fail(field, value, "non-empty", f"name at least one layer, e.g. {example}, or leave None")
        return tuple(dict.fromkeys(value))


def _check_subset(targets, feedforward, where: str) -> None:
    """HF peft's rule: with both given as lists, every feed-forward entry is also a target entry."""
    if isinstance(targets, tuple) and isinstance(feedforward, tuple):
        extra = [f for f in feedforward if f not in targets]
        if extra:
            raise ValueError(
                f"IA3Config.feedforward_modules entries {extra} are not in target_modules={list(targets)}{where}: "
                f"a feed-forward module is a target whose input is scaled, so HF peft requires feedforward_modules "
                f"to be a subset of target_modules; add {extra} to target_modules or remove them from "
                "feedforward_modules")


def _resolve(model: nn.Module, config: IA3Config) -> tuple[tuple[str, ...] | str, tuple[str, ...] | str]:
    """(target_modules, feedforward_modules) with ``None`` replaced by the model type's defaults."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    known = f"model types with IA³ defaults: {sorted(DEFAULTS)}"
    targets, ff = config.target_modules, config.feedforward_modules
    if targets is None:
        if mt not in DEFAULTS:
            raise ValueError(f"IA3Config.target_modules=None, but peftlab has no IA³ defaults for model_type={mt!r} "
                             f"({known}): name the key, value and feed-forward output layers, e.g. "
                             f"target_modules=[...], feedforward_modules=[...]; linear layers here: "
                             f"{linear_suffixes(model)}")
        targets = DEFAULTS[mt][0]
    if ff is None:
        if config.target_modules is None:
            ff = DEFAULTS[mt][1]
        elif mt in DEFAULTS:
            ff = DEFAULTS[mt][1] if isinstance(targets, str) else tuple(f for f in DEFAULTS[mt][1] if f in targets)
        else:
            raise ValueError(f"IA3Config.feedforward_modules=None, but peftlab has no IA³ defaults for "
                             f"model_type={mt!r} ({known}): say which targets are feed-forward layers (scaled on "
                             "their input), e.g. feedforward_modules=['down_proj'], or feedforward_modules=() for none")
    _check_subset(targets, ff, f" (the defaults for model_type={mt!r})")
    return targets, ff


def _is_target(name: str, targets: tuple[str, ...] | str) -> list[str]:
    """The target entries that select module ``name`` (a regex string counts as one entry)."""
    if isinstance(targets, str):
        return [targets] if re.fullmatch(targets, name) else []
    return [t for t in targets if name == t or name.endswith("." + t)]


def _is_feedforward(name: str, feedforward: tuple[str, ...] | str) -> bool:
    """HF peft's ``_check_target_module_feedforward``: full-match regex, or plain ``str.endswith``."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(f) for f in feedforward)


class IA3Linear(AdapterLayer):
    """Wrap an ``nn.Linear`` or GPT-2 ``Conv1D`` with named IA³ vectors.

    Input x: (..., in_features); output: (..., out_features), as the base layer. Adapter ``name``
    holds ``ia3_l[name]``: (out, 1) for an output layer (y * l), (1, in) for a feed-forward layer
    (base(x * l)). ``merged`` is the adapter folded into the weights (or None); while merged,
    ``unmerged_weight`` / ``unmerged_bias`` (non-persistent buffers) keep the exact originals.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(base_layer, LINEAR_TYPES):
            raise TypeError(f"IA3Linear cannot wrap {type(base_layer).__name__}: only nn.Linear and GPT-2 Conv1D")
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}  # name -> scales the input (True) or the output (False)
        self.active: str | None = None
        self.merged: str | None = None
        self.disabled = False
        self.register_buffer("unmerged_weight", None, persistent=False)
        self.register_buffer("unmerged_bias", None, persistent=False)

    def add_adapter(self, name: str, feedforward: bool) -> None:
        """Create adapter ``name`` with its vector at ones (the base layer's outputs). Does not activate it."""
        if name in self.ia3_l:
            raise ValueError(f"adapter {name!r} already exists in this layer: pick another name or delete it first")
        w = self.base_layer.weight
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, device=w.device, dtype=adapter_dtype(w)))
        self.feedforward[name] = feedforward

    def delete_adapter(self, name: str) -> None:
        if self.merged == name:
            raise RuntimeError(f"adapter {name!r} is merged into the weight: unmerge() before deleting it")
        del self.ia3_l[name]
        del self.feedforward[name]
        if self.active == name:
            self.active = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.ia3_l)

    def activate(self, name: str | None) -> None:
        self.active = name if name in self.ia3_l else None

    @property
    def is_merged(self) -> bool:
        return self.merged is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> base(x) * l (..., out) for an output layer, base(x * l) for a feed-forward one."""
        if self.disabled and self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is merged, so it cannot be disabled: call unmerge() first")
        if self.disabled or self.active is None or self.merged is not None:
            return self.base_layer(x)
        vec = self.ia3_l[self.active].flatten()  # (in,) or (out,)
        if self.feedforward[self.active]:
            return self.base_layer((x.to(vec.dtype) * vec).to(x.dtype))  # (..., in) * (in,)
        y = self.base_layer(x)
        return (y * vec).to(y.dtype)  # (..., out) * (out,)

    # -- merging ----------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the active adapter into the weight: rows of W (and b) for an output layer, columns for a
        feed-forward one; in at least float32, cast back once."""
        if self.active is None:
            return
        if self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is already merged: call unmerge() before merging again")
        name, w, b = self.active, self.base_layer.weight, self.base_layer.bias
        ff = self.feedforward[name]
        dt = torch.promote_types(w.dtype, torch.float32)
        vec = self.ia3_l[name].detach().to(dt).flatten()  # (in,) or (out,)
        in_dim = 0 if self.fan_in_fan_out else 1  # Conv1D keeps (in, out), nn.Linear (out, in)
        shape = [1, 1]
        shape[in_dim if ff else 1 - in_dim] = -1  # scale along the input (columns) or the output (rows)
        self.unmerged_weight = w.detach().clone()
        with torch.no_grad():
            w.copy_((w.to(dt) * vec.view(shape)).to(w.dtype))
            if not ff and b is not None:
                self.unmerged_bias = b.detach().clone()
                b.copy_((b.to(dt) * vec).to(b.dtype))
        self.merged = name

    def unmerge(self) -> None:
        """Put the exact pre-merge weight (and bias) back; changes made to them while merged are lost."""
        if self.merged is None:
            raise RuntimeError("nothing to unmerge: no IA³ adapter is merged into this layer")
        with torch.no_grad():
            self.base_layer.weight.copy_(self.unmerged_weight)
            if self.unmerged_bias is not None:
                self.base_layer.bias.copy_(self.unmerged_bias)
        self.unmerged_weight = self.unmerged_bias = None
        self.merged = None

    def unloaded(self) -> nn.Module:
        """The base layer with the active adapter folded in."""
        if self.merged is None:
            self.merge()
        return self.base_layer

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{n}: {'input' if f else 'output'}" for n, f in self.feedforward.items())
        return f"in={self.in_features}, out={self.out_features}, adapters=[{kinds}], merged={self.merged}"


# -- which layers ------------------------------------------------------------------------------
@dataclass
class Site:
    path: str
    module: nn.Module  # the base layer, or the IA3Linear already wrapping it
    feedforward: bool
    size: int  # parameters the vector has: d_in (feed-forward) or d_out
    why: str


def _heads(model: nn.Module) -> set[int]:
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_out() if callable(get_out) else None
    return {id(m) for n, m in walk(model) if n.rsplit(".", 1)[-1] in HEAD_NAMES or (emb is not None and m is emb)}


def ia3_sites(model: nn.Module, config: IA3Config, name: str | None = None) -> tuple[list[Site], list]:
    """The layers ``config`` adapts in ``model`` and its ``modules_to_save`` matches; pure.

    Raises ``ValueError`` (naming the value and the fix) for a target entry that matches nothing,
    that matches something other than a linear layer, an output head, or a saved module.
    """
    targets, ff = _resolve(model, config)
    saves = find_saves(model, config.modules_to_save)
    saved = [p for p, _ in saves]
    heads, cls = _heads(model), type(model).__name__
    field = f"IA3Config.target_modules={targets!r}" + (" (the defaults)" if config.target_modules is None else "")
    sites, hit = [], set()
    for path, mod in walk(model):
        keys = _is_target(path, targets)
        if not keys:
            continue
        hit.update(keys)
        around = next((s for s in saved if path == s or path.startswith(s + ".")), None)
        if around is not None:
            raise ValueError(f"{field} matches {path!r}, which is (inside) modules_to_save entry {around!r}: that "
                             "module is trained in full, so an IA³ vector there would never run. Remove it from "
                             "target_modules or from modules_to_save")
        if id(mod) in heads:
            raise ValueError(f"{field} matches {path!r}, the model's output head: an IA³ vector there only rescales "
                             "the logits, not keys, values or feed-forward activations. Remove it from target_modules "
                             f"and train the head fully with modules_to_save=[{path.rsplit('.', 1)[-1]!r}]")
        if isinstance(mod, AdapterLayer) and not isinstance(mod, IA3Linear):
            raise ValueError(f"{field} matches {path!r}, which already holds adapter(s) {mod.adapter_names} of another "
                             f"method ({type(mod).__name__}): peftlab puts one method per layer; target other layers "
                             "or peftlab.delete() that adapter first")
        base = mod.base_layer if isinstance(mod, IA3Linear) else mod
        if not isinstance(base, LINEAR_TYPES):
            raise ValueError(f"{field} matches {path!r}, a {type(base).__name__}: IA³ rescales the outputs of key/value "
                             "projections and the inputs of feed-forward output layers, all nn.Linear (or GPT-2 "
                             f"Conv1D). Target those linear layers instead; linear layers here: {linear_suffixes(model)}")
        if name is not None and isinstance(mod, IA3Linear) and name in mod.ia3_l:
            raise ValueError(f"{path!r} already has an IA³ adapter named {name!r}")
        is_ff = _is_feedforward(path, ff)
        d_in, d_out, _ = linear_shape(base)
        sites.append(Site(path, mod, is_ff, d_in if is_ff else d_out,
                          f"{'regex' if isinstance(targets, str) else 'suffix'} {keys[0]!r}"))
    unmatched = [t for t in ([targets] if isinstance(targets, str) else targets) if t not in hit]
    if unmatched:
        raise ValueError(f"{field}: {unmatched} match no module of {cls}: choose among its linear layers "
                         f"(by suffix): {linear_suffixes(model)}")
    return sites, saves


def ia3_parameters(model: nn.Module, config: IA3Config) -> int:
    """Parameters IA³ adds: d_out per key/value (output) layer plus d_in per feed-forward layer."""
    return sum(s.size for s in ia3_sites(model, config)[0])


# -- the method's hooks ------------------------------------------------------------------------
def _layers(model: nn.Module, name: str) -> list[tuple[str, IA3Linear]]:
    return [(p, m) for p, m in walk(model) if isinstance(m, IA3Linear) and name in m.ia3_l]


def _inject(model: nn.Module, config: IA3Config, name: str) -> None:
    sites, saves = ia3_sites(model, config, name)  # every check before the first change
    for s in sites:
        layer = s.module if isinstance(s.module, IA3Linear) else IA3Linear(s.module)
        layer.add_adapter(name, s.feedforward)
        if layer is not s.module:
            replace_module(model, s.path, layer)
    add_saves(model, config.modules_to_save, name, saves)


def _mark_trainable(model: nn.Module, config: IA3Config, name: str) -> None:
    for _, m in _layers(model, name):
        m.ia3_l[name].requires_grad_(True)
    mark_saves(model, name)


def _delete(model: nn.Module, name: str) -> None:
    for path, m in _layers(model, name):
        m.delete_adapter(name)
        if not m.adapter_names:
            replace_module(model, path, m.base_layer)
    delete_saves(model, name)


def _merge(model: nn.Module, name: str) -> None:
    layers = [m for _, m in _layers(model, name)]
    if not layers:
        raise RuntimeError(f"adapter {name!r} has no IA³ layers in this model to merge")
    if any(m.is_merged for m in layers):
        raise RuntimeError("IA³ weights are already merged: calling merge() twice would scale them twice")
    for m in layers:
        m.merge()


def _can_unload(model: nn.Module, name: str) -> None:
    """IA³ always folds into the weights (``IA3Linear.unloaded``): nothing to refuse."""


def owns_ia3(parameter_name: str) -> bool:
    """Every IA³ parameter is ``<layer path>.ia3_l.<adapter name>``."""
    return ".ia3_l." in f".{parameter_name}"


def _state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s live tensors under peft's keys (peft drops the adapter name)."""
    out = {f"{PREFIX}{p}.ia3_l": m.ia3_l[name] for p, m in _layers(model, name)}
    out.update(saved_copies(model, name, prefix=PREFIX))
    return out



def _save(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    config = configs(model)[name]
    targets, ff = _resolve(model, config)
    as_json = (lambda v: v if isinstance(v, str) else sorted(v))  # noqa: E731
    meta = {
        "peft_type": "IA3",
        "task_type": peft_task_type(model, config.modules_to_save),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "target_modules": as_json(targets),
        "feedforward_modules": as_json(ff),
        "modules_to_save": list(config.modules_to_save) or None,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in _layers(model, name)),
        "init_ia3_weights": True,
        "inference_mode": True,
        "peftlab": {"format_version": FORMAT_VERSION, "adapter_name": name, "config": config.to_dict()},
    }
    return _state_dict(model, name), meta


def _read_config(model: nn.Module, d: Path) -> IA3Config:
    path = d / CONFIG_NAME
    raw = read_adapter_config(d)
    record = raw.get("peftlab")
    try:
        if isinstance(record, dict) and "config" in record:
            return IA3Config.from_dict(record["config"])
        if raw.get("peft_type") != "IA3":
            raise ValueError(f"peft_type is {raw.get('peft_type')!r}, but only 'IA3' adapters can be loaded here")
        if raw.get("exclude_modules"):
            raise ValueError(f"exclude_modules={raw['exclude_modules']!r} is not implemented by peftlab's IA³: "
                             "spell target_modules out without the excluded layers")
        listed = lambda v: v if isinstance(v, str) or v is None else tuple(sorted(v))  # noqa: E731
        config = IA3Config(target_modules=listed(raw.get("target_modules")),
                           feedforward_modules=listed(raw.get("feedforward_modules")),
                           modules_to_save=tuple(raw.get("modules_to_save") or ()))
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    # peft lists heads for SEQ_CLS ("classifier" and "score") of which a model has only one
    present = tuple(k for k in config.modules_to_save
                    if any(n == k or n.endswith("." + k) for n, _ in walk(model)))
    return dataclasses.replace(config, modules_to_save=present)


def _load(model: nn.Module, d: Path, name: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Check an IA³ folder (config and already-read ``tensors``) against ``model``, then inject and copy."""
    config = _read_config(model, d)
    if name in configs(model):
        raise ValueError(f"an adapter named {name!r} is already injected: load under another name or delete it first")
    cls = type(model).__name__
    try:
        sites, saves = ia3_sites(model, config, name)
    except ValueError as exc:
        raise ValueError(f"adapter in {d} does not fit this {cls} (wrong base model?): {exc}") from exc
    required = {f"{PREFIX}{s.path}.ia3_l": (1, s.size) if s.feedforward else (s.size, 1) for s in sites}
    required.update(saved_shapes(saves, prefix=PREFIX))
    missing = [k for k in required if k not in tensors]
    unexpected = [k for k in tensors if k not in required]
    wrong = [f"{k}: file {tuple(v.shape)} vs model {required[k]}" for k, v in tensors.items()
             if k in required and tuple(v.shape) != required[k]]
    if missing or unexpected or wrong:
        parts = [f"shape mismatch: {fmt_list(wrong)}" if wrong else "",
                 f"missing keys: {fmt_list(missing)}" if missing else "",
                 f"unexpected keys: {fmt_list(unexpected)}" if unexpected else ""]
        raise ValueError(f"adapter in {d} does not fit this {cls} -- " + " | ".join(p for p in parts if p)
                         + ": load it onto the base model it was trained on")
    inject(model, config, name)
    live = _state_dict(model, name)
    with torch.no_grad():
        for k, v in tensors.items():
            live[k].copy_(v)
    return model


def _explain(model: nn.Module, config: IA3Config) -> ExplainReport:
    """Which layers ``config`` would scale (and on which side), and the parameters each adds; pure."""
    sites, saves = ia3_sites(model, config)
    rows = []
    for s in sites:
        base = s.module.base_layer if isinstance(s.module, IA3Linear) else s.module
        d_in, d_out, _ = linear_shape(base)
        side = "input (feed-forward)" if s.feedforward else "output"
        rows.append(ExplainRow(s.path, "ia3", type(base).__name__, f"{s.why}, scales the {side}",
                               f"{d_in} -> {d_out}", s.size))
    for n, m in saves:
        src = m.original_module if isinstance(m, ModulesToSaveWrapper) else m
        rows.append(ExplainRow(n, "modules_to_save", type(src).__name__, "modules_to_save", "",
                               sum(p.numel() for p in src.parameters())))
    base_total = sum(p.numel() for n, p in base_parameters(model) if ".modules_to_save." not in n)
    return ExplainReport(config, rows, base_total)


HOOKS = MethodHooks(method="ia3", config=IA3Config, inject=_inject, mark_trainable=_mark_trainable, delete=_delete,
                    save=_save, load=_load, owns=owns_ia3, merge=_merge, unload=_can_unload, explain=_explain,
                    peft_type="IA3")
