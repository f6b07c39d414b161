"""Serving many LoRA adapters from one frozen model: mixed batches and hot-swapping.

LoRA (Hu et al. 2021, arXiv:2106.09685) keeps the base weight W frozen and adds a small
update per task, so one copy of W can serve every task at once.  In a *mixed batch* each row
names its own adapter: every adapted layer computes the base output ``x W^T + b`` once for the
whole batch (n, ..., in), then, for each distinct adapter, ``s * x_rows A^T B^T`` on its rows
only, added back into those rows.  Rows named :data:`BASE` get the base output alone.  This is
the idea behind S-LoRA (Sheng et al. 2023, arXiv:2311.03285), Punica (Chen et al. 2023,
arXiv:2310.18547) and HF peft's ``adapter_names=`` argument, written here without their
fused kernels.

* :func:`adapter_rows` (a context manager) routes the rows; :func:`forward` and :func:`generate`
  wrap a forward pass and greedy ``generate()`` (KV cache on) in it after checking the batch size.
* :func:`hotswap` copies a saved LoRA adapter's weights into an adapter already injected, in
  place (same module objects, no re-injection), e.g. to replace a task's adapter by a newly
  trained one while the model keeps serving; ``peftlab.delete(model, name)`` unloads one.
* :func:`model_bytes` / :func:`adapter_bytes` count memory as the serving benchmark
  (``python -m peftlab.bench mixed``, ``peftlab/bench/mixed.py``) reports it.

Explained in notebooks/11_serving_many_adapters.ipynb.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .config import LoRAConfig
from .inject import BASE_ROWS
from .io import (CONFIG_NAME, WEIGHTS_NAME, _check_weights, _method_of, _read_weights, adapter_state_dict, fmt_list,
                 read_adapter_config)
from .lora import LoRALinear
from .lora_io import _read_config, lora_state_dict
from .registry import active_adapter, adapters_disabled, configs
from .tree import adapter_layers
from .wrappers import ModulesToSaveWrapper

__all__ = ["BASE", "RowRoute", "adapter_rows", "forward", "generate", "hotswap", "model_bytes", "adapter_bytes"]

BASE = BASE_ROWS  # "__base__": the adapter name of a row that gets the base model alone (inject refuses it)


@dataclass(frozen=True)
class RowRoute:
    """Which rows of a batch go to which adapter; computed once per :func:`adapter_rows` block.

    ``names``: the adapter (or :data:`BASE`) of each of the n rows; ``groups``: adapter name ->
    its row indices, a long tensor (n_name,) on the model's device (:data:`BASE` rows appear in none).
    """

    names: tuple[str, ...]
    groups: dict[str, torch.Tensor]

    @property
    def size(self) -> int:
        return len(self.names)

    def check(self, rows: int | None, layer: nn.Module) -> None:
        """Raise ``ValueError`` when a layer's input does not have one row per adapter name."""
        if rows != self.size:
            raise ValueError(f"a mixed batch of {self.size} adapter names reached a {type(layer).__name__} whose "
                             f"input has {rows} rows (leading dimension): pass exactly one name per row of the "
                             "batch, in the batch's order")


def _routed_layers(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in adapter_layers(model) if isinstance(m, (LoRALinear, ModulesToSaveWrapper))]


def _check_names(model: nn.Module, adapter_names) -> tuple[str, ...]:
    """The names as a tuple after every check; raises (changing nothing) on the first problem."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(f"adapter_names must be a list with one adapter name per row, got "
                        f"{type(adapter_names).__name__}: e.g. ['sst', '{BASE}', 'sst']")
    names = tuple(adapter_names)
    if not names:
        raise ValueError("adapter_names is empty: give one adapter name (or peftlab.serving.BASE) per row")
    loaded = configs(model)
    lora = [n for n, c in loaded.items() if isinstance(c, LoRAConfig)]
    for n in dict.fromkeys(names):
        if n == BASE:
            continue
        if not isinstance(n, str) or n not in loaded:
            raise ValueError(f"adapter {n!r} of the mixed batch is not loaded: the model has LoRA adapters {lora} "
                             f"(use peftlab.serving.BASE = {BASE!r} for rows that need the base model alone)")
        if not isinstance(loaded[n], LoRAConfig):
            raise ValueError(f"adapter {n!r} is a {type(loaded[n]).__name__}, but mixed batches route LoRA adapters "
                             f"only (LoRA adapters here: {lora})")
    if any(m.training for m in model.modules()):
        raise RuntimeError("the model is in training mode: mixed batches are for inference (dropout would differ "
                           "per route and gradients mean nothing across adapters); call model.eval() first")
    layers = _routed_layers(model)
    if any(isinstance(m, LoRALinear) and m.merged for m in layers):
        raise RuntimeError("LoRA weights are merged into the base, so every row would get them: call "
                           "peftlab.unmerge(model) before serving a mixed batch")
    if adapters_disabled(model) or any(m.disabled for m in layers):
        raise RuntimeError("adapters are disabled (inside peftlab.disabled(model)): leave that block first, or "
                           f"name rows {BASE!r} to get the base model for them")
    active = active_adapter(model)
    if active is not None and not isinstance(loaded[active], LoRAConfig):
        raise RuntimeError(f"the active adapter {active!r} is a {type(loaded[active]).__name__}, which would apply "
                           "to every row of the batch: call peftlab.set_active(model, None) first")
    if any(m.row_route is not None for m in layers):
        raise RuntimeError("the model is already inside peftlab.serving.adapter_rows(): blocks cannot be nested")
    return names


@contextlib.contextmanager
def adapter_rows(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Within the block, row i of every batch goes to adapter ``adapter_names[i]`` (or the base model).

    Every LoRA layer and ``modules_to_save`` wrapper of ``model`` routes its input (n, ..., in) by
    rows: n must equal ``len(adapter_names)`` (else ``ValueError`` naming both numbers). Each
    row's output equals what its adapter gives alone, up to float rounding. Everything is checked
    before any layer changes; the layers are restored on exit, also after an exception. The
    active adapter and ``requires_grad`` flags are not touched.
    """
    names = _check_names(model, adapter_names)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rows: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        if n != BASE:
            rows.setdefault(n, []).append(i)
    route = RowRoute(names, {n: torch.tensor(idx, dtype=torch.long, device=device) for n, idx in rows.items()})
    layers = _routed_layers(model)
    try:
        for m in layers:
            m.row_route = route
        yield model
    finally:
        for m in layers:
            m.__dict__.pop("row_route", None)  # back to the class default, None


def _batch_rows(batch: dict) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if torch.is_tensor(batch.get(key)):
            return batch[key].shape[0]
    raise ValueError(f"the batch has neither input_ids nor inputs_embeds (keys: {sorted(batch)}): pass the "
                     "tokenizer's output, e.g. tokenizer(texts, padding=True, return_tensors='pt')")


def _check_length(batch: dict, adapter_names) -> None:
    rows = _batch_rows(batch)
    if isinstance(adapter_names, Sequence) and not isinstance(adapter_names, str) and len(adapter_names) != rows:
        raise ValueError(f"the batch has {rows} rows but {len(adapter_names)} adapter names were given: "
                         "give exactly one name per row")


def forward(model: nn.Module, batch: dict, adapter_names: Sequence[str]):
    """``model(**batch)`` with row i served by adapter ``adapter_names[i]``; the model's usual output."""
    _check_length(batch, adapter_names)
    with adapter_rows(model, adapter_names):
        return model(**batch)


def generate(model: nn.Module, adapter_names: Sequence[str], **generate_kwargs) -> torch.Tensor:
    """``model.generate(**generate_kwargs)`` with row i served by ``adapter_names[i]``.

    Greedy (``do_sample=False``) with the KV cache on unless the caller says otherwise.  Beam search
    and ``num_return_sequences > 1`` repeat each row inside ``generate``, so they are refused: repeat
    the rows (and their names) in the batch instead.  Returns (n, prompt + new tokens) ids.
    """
    _check_length(generate_kwargs, adapter_names)
    defaults = getattr(model, "generation_config", None)
    for key in ("num_beams", "num_return_sequences"):
        value = generate_kwargs.get(key, getattr(defaults, key, 1) or 1)
        if value != 1:
            raise ValueError(f"{key}={value} makes generate() repeat each row, which a mixed batch cannot route: "
                             "use greedy decoding (num_beams=1, num_return_sequences=1) and repeat rows yourself")
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("use_cache", True)
    with adapter_rows(model, adapter_names):
        return model.generate(**generate_kwargs)


# -- hot-swap ------------------------------------------------------------------------------
def _same_base(model: nn.Module, raw: dict, d: Path) -> None:
    """Refuse a peft config whose ``base_model_name_or_path`` names another model than ``model``'s."""
    saved = raw.get("base_model_name_or_path")
    ours = getattr(getattr(model, "config", None), "name_or_path", None)
    if saved and ours and Path(str(saved)).name != Path(str(ours)).name:  # compare names, not folders
        raise ValueError(f"adapter in {d} was saved from base model {saved!r}, but this model is {ours!r}: "
                         "hot-swap only adapters trained on the same base")


def hotswap(model: nn.Module, directory, name: str) -> nn.Module:
    """Copy the LoRA adapter saved in ``directory`` into the injected adapter ``name``, in place.

    The tensors of ``name`` (lora_A / lora_B, DoRA's magnitude, its ``modules_to_save`` copies)
    are overwritten with ``copy_``: the same module objects, no re-injection, no other adapter
    touched.  The saved alpha, rsLoRA flag and dropout may differ (the scaling is updated); the
    rank, DoRA flag, adapted modules and base shapes must match.  Everything is checked first, so
    on any error (``ValueError``; ``FileNotFoundError`` for a missing folder) the model is unchanged.
    """
    d = Path(directory)
    loaded = configs(model)
    if name not in loaded:
        raise ValueError(f"no adapter named {name!r} to hot-swap into: injected adapters are {list(loaded)}; "
                         f"load a new one with peftlab.load_adapter(model, {str(d)!r}, {name!r})")
    old = loaded[name]
    if not isinstance(old, LoRAConfig):
        raise ValueError(f"adapter {name!r} is a {type(old).__name__}: hotswap() replaces LoRA adapters only")
    layers = [m for _, m in adapter_layers(model) if isinstance(m, LoRALinear) and name in m.lora_A]
    if any(m.merged for m in layers):
        raise RuntimeError("LoRA weights are merged into the base: call peftlab.unmerge(model) before hot-swapping")
    for f in (WEIGHTS_NAME, CONFIG_NAME):
        if not (d / f).is_file():
            raise FileNotFoundError(f"{d / f} is missing: pass a folder written by peftlab.save_adapter or peft")
    method = _method_of(d)
    if method != "lora":
        raise ValueError(f"{d} holds a {method!r} adapter, not a LoRA one: hotswap() swaps LoRA adapters")
    new, _, _ = _read_config(d)  # peftlab's / peft's reader: refuses base-rewriting inits and unknown features
    _same_base(model, read_adapter_config(d), d)
    if new.r != old.r:
        raise ValueError(f"adapter in {d} has rank r={new.r}, but {name!r} has r={old.r}: hot-swap copies weights of "
                         "the same shape; load it under a new name with peftlab.load_adapter instead")
    if new.use_dora != old.use_dora:
        raise ValueError(f"adapter in {d} has use_dora={new.use_dora}, but {name!r} has use_dora={old.use_dora}: "
                         "load it under a new name with peftlab.load_adapter instead")
    if new.bias != "none" or old.bias != "none":
        raise ValueError(f"bias={new.bias!r} (file) / {old.bias!r} ({name!r}): trained biases belong to the shared "
                         "base layers, so swapping them would change every adapter; hot-swap bias='none' adapters")
    tensors, metadata = _read_weights(d)
    _check_weights(model, d, tensors, metadata)  # floating-point, finite, both files from one save
    live = lora_state_dict(model, name)
    missing = [k for k in live if k not in tensors]
    unexpected = [k for k in tensors if k not in live]
    if missing or unexpected:
        parts = [f"missing keys: {fmt_list(missing)}" if missing else "",
                 f"unexpected keys: {fmt_list(unexpected)}" if unexpected else ""]
        raise ValueError(f"adapter in {d} adapts other modules than {name!r} (different target_modules / "
                         f"modules_to_save, or another base model) -- {' | '.join(p for p in parts if p)}: "
                         "load it under a new name with peftlab.load_adapter instead")
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(live[k].shape)}" for k, v in tensors.items()
             if tuple(v.shape) != tuple(live[k].shape)]
    if wrong:
        raise ValueError(f"adapter in {d} does not fit this {type(model).__name__} (another base model?) -- shape "
                         f"mismatch: {fmt_list(wrong)}")
    # every check passed: from here on nothing can fail
    with torch.no_grad():
        for k, v in tensors.items():
            live[k].copy_(v)
    scale = new.alpha / math.sqrt(new.r) if new.use_rslora else new.alpha / new.r
    for m in layers:
        m.scaling[name] = scale
        if type(m.lora_dropout[name]) is not (nn.Dropout if new.dropout > 0 else nn.Identity):
            drop = nn.Dropout(new.dropout) if new.dropout > 0 else nn.Identity()
            m.lora_dropout[name] = drop.train(m.training)  # holds no parameters: nothing else to keep
        elif new.dropout > 0:
            m.lora_dropout[name].p = new.dropout
    loaded[name] = dataclasses.replace(old, alpha=new.alpha, use_rslora=new.use_rslora, dropout=new.dropout,
                                       init=new.init)
    return model


# -- memory --------------------------------------------------------------------------------
def _unique_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()  # shared (tied) tensors counted once
    return sum(seen.values())


def model_bytes(*models: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``models`` together, each storage counted once."""
    return _unique_bytes(t for m in models for t in (*m.parameters(), *m.buffers()))


def adapter_bytes(model: nn.Module, name: str) -> int:
    """Bytes of adapter ``name``'s own tensors (LoRA A, B, DoRA's m, ``modules_to_save`` copies)."""
    return _unique_bytes(adapter_state_dict(model, name).values())
