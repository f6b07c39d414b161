"""Saving and loading adapters of every method: the files, their checks, and the dispatch.

An adapter folder holds ``adapter_model.safetensors`` (the tensors), ``adapter_config.json``
(HF peft's config for methods peft has, so ``peft.PeftModel.from_pretrained`` reads it) and
``peftlab_adapter.json`` (peftlab's own record: format version, adapter name, full config).
:func:`save_adapter` asks the adapter's method (``peftlab.registry``) for its tensors and
JSON and writes them; :func:`load_adapter` reads and checks the files (every tensor
floating-point and finite, both files from one save), then hands them to the method's
loader, which checks them against the model before it changes anything.

Only safetensors and JSON are ever read -- never pickle (``torch.load``). Saving replaces
only the adapter's own files, each atomically (``peftlab/atomic.py``). Each method's own
format: ``peftlab/lora_io.py`` (LoRA, peft's layout), ``peftlab/prefix_io.py`` (prefix and
prompt tuning, peft's layout), ``peftlab/adapters.py`` (bottleneck adapters, peftlab's own).
Explained in notebooks/03_lora.ipynb.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import atomic
from .registry import all_hooks, configs, hooks_for, hooks_for_method
from .wrappers import SAVES_PREFIX

__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "read_adapter_json", "read_adapter_config",
           "tensor_problem",
           "fmt_list", "peft_task_type", "CONFIG_NAME", "WEIGHTS_NAME", "PEFTLAB_NAME", "PEFT_PREFIX", "FORMAT_VERSION"]

CONFIG_NAME = "adapter_config.json"
# peftlab's own record of an adapter (format version, name, full config, shapes) lives beside
# adapter_config.json, not inside it: HF peft warns about (and tells users to upgrade for) any
# key of adapter_config.json it does not know.
PEFTLAB_NAME = "peftlab_adapter.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's key prefix: PeftModel.base_model (LoraModel).model
FORMAT_VERSION = 1


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


def read_adapter_config(d: Path) -> dict:
    """``read_adapter_json(d)`` as a dict, or a ValueError naming the bad file and the fix."""
    try:
        raw = read_adapter_json(d)
    except json.JSONDecodeError as exc:  # its message names the file: adapter_config.json or peftlab_adapter.json
        raise ValueError(f"{exc}: the adapter directory is corrupt, save it again") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{d / CONFIG_NAME} must hold a JSON object, got {type(raw).__name__}: save the adapter again")
    return raw


def _method_of(d: Path) -> str:
    """The method of the adapter in ``d``: peftlab's record, else peft's ``peft_type``; a ValueError
    naming the file when neither says (or the JSON is broken)."""
    path = d / CONFIG_NAME
    raw = read_adapter_config(d)
    record = raw.get("peftlab")
    ours = record.get("config", {}).get("method") if isinstance(record, dict) and isinstance(
        record.get("config"), dict) else None
    if isinstance(ours, str):
        return ours
    by_peft = {h.peft_type: h.method for h in all_hooks() if h.peft_type}
    if raw.get("peft_type") in by_peft:
        return by_peft[raw["peft_type"]]
    raise ValueError(f"{path}: peft_type is {raw.get('peft_type')!r}, but only {sorted(by_peft)} adapters "
                     "(and peftlab's own folders) can be loaded here")


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under the keys its file uses (LoRA: live tensors, peft's keys)."""
    if name not in configs(model):
        raise ValueError(f"no adapter named {name!r} in the model: injected adapters are {list(configs(model))}")
    return hooks_for(configs(model)[name]).save(model, name)[0]


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
    if name not in configs(model):
        raise ValueError(f"no adapter named {name!r} in the model: injected adapters are {list(configs(model))}")
    tensors, meta = hooks_for(configs(model)[name]).save(model, name)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
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


def peft_task_type(model: nn.Module, modules_to_save) -> str | None:
    """The ``task_type`` a peft ``adapter_config.json`` should carry for ``model`` (None: none claimed).

    peft adds "classifier"/"score" to modules_to_save for SEQ_CLS and then expects their tensors,
    so SEQ_CLS is claimed only when the head is really saved.
    """
    cls = type(model).__name__
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if cls.endswith("ForSequenceClassification") and {"classifier", "score"} & set(modules_to_save):
        return "SEQ_CLS"
    return None


def fmt_list(items: list[str], limit: int = 5) -> str:
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
        name = key.removeprefix(PEFT_PREFIX).removeprefix(SAVES_PREFIX)  # peft's / prefix_io's layouts
        owner, _, leaf = name.rpartition(".")
        return own.get(name, own.get(f"{owner}.original_module.{leaf}"))  # the module may be wrapped already

    problems = [f"tensor {k!r} {p}" for k, v in tensors.items() if (p := tensor_problem(v, like(k))) is not None]
    if problems:
        raise ValueError(f"{d / WEIGHTS_NAME}: {fmt_list(problems)}; refusing to load it (a damaged file, or one saved "
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
    The folder's method (peftlab's record, else peft's ``peft_type``) picks the method's loader.
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
    return hooks_for_method(_method_of(d)).load(model, d, name, tensors)
