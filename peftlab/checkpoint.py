"""Training checkpoints that are atomic, pickle-free and resume bit-for-bit.

A checkpoint is a folder ``<output_dir>/checkpoints/step-000040/`` holding

* ``trainable.safetensors``: every trainable parameter, by name;
* ``optimizer.safetensors``: the optimizer's per-parameter tensors, flattened to
  ``"<param name>::<state key>"`` (AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``);
* ``rng.safetensors``: torch's CPU and CUDA generator states (uint8 tensors);
* ``state.json``: step, position in the epoch, history, the TrainConfig, Python/NumPy RNG
  states, the optimizer's hyper-parameters and parameter order, the shapes of the
  trainable parameters (to refuse a checkpoint of another model clearly), the dtype and
  shape of every tensor of the three files, and the id of the save that wrote them.

Only safetensors and JSON are read back: no pickle, no ``torch.load``. Writing goes through
``peftlab.atomic``: a new step folder is built under a temporary name, flushed, and renamed
into place; re-saving an existing step replaces its files one by one (``state.json`` last),
so the folder that ``latest`` names never disappears, and an interrupted re-save puts the
old files back. Only then is the one-line ``latest`` file replaced (``os.replace``). A crash
at any point leaves ``latest`` naming a complete checkpoint; the one case left, a hard kill
between the renames of a re-save, is reported on resume (the save ids differ) instead of
resuming from a mix. Loading checks every file, key, shape, dtype and value before anything
is copied into the model, the optimizer or the RNGs. Explained in
``notebooks/07_training.ipynb`` ("Checkpoints and resuming").
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import atomic
from .io import tensor_problem

__all__ = ["save_checkpoint", "load_checkpoint", "resolve_checkpoint", "CheckpointMismatch", "CheckpointDamaged"]

LATEST = "latest"
STATE = "state.json"
FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", STATE)
FORMAT_VERSION = 2  # 2 adds "tensors" (dtype and shape of each tensor), "state_keys" and "save_id"
SAVE_ID = "peftlab_save_id"  # safetensors metadata key; the same id is state.json's "save_id"
_LEGACY_TMP = (".tmp-",)  # version-1 temporaries: ".tmp-step-*" folders and ".tmp-latest-*" files
_STEP = re.compile(r"step-(\d+)")


class CheckpointMismatch(ValueError):
    """The checkpoint was written for a model with other trainable parameters."""


class CheckpointDamaged(ValueError):
    """A file of the checkpoint is unreadable, incomplete or holds values no save writes."""


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, save_id: str) -> None:
    save_file(tensors, str(path), metadata={SAVE_ID: save_id})


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(mt), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of ``model`` by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")  # "float32": how state.json records a dtype


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step-N`` folder, oldest first (by number: 999998 < 1000000)."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(folder: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, param_names: list[list[str]],
                    state: dict[str, Any], keep: int | None = None) -> Path:
    """Write checkpoint ``step-<step>`` under ``folder`` atomically; return its path.

    ``param_names[g]`` lists the names of the parameters of optimizer group ``g`` in order.
    ``state`` is any JSON-able training state (step, epoch, history, config...).
    ``keep``: how many complete checkpoints to keep (oldest removed after ``latest`` moves).
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale(root)  # leftovers of an earlier crash, files and folders
    atomic.remove_stale(root, _LEGACY_TMP)
    name = f"step-{step:06d}"
    params = {n: p.detach().cpu().contiguous().clone() for n, p in trainable_state(model).items()}
    # optimizer: tensors by "<name>::<key>", everything else in JSON
    opt = optimizer.state_dict()
    flat, scalars = {}, {}
    index = [n for group in param_names for n in group]
    for idx, per_param in opt["state"].items():
        pname = index[idx]
        for key, value in per_param.items():
            if torch.is_tensor(value):
                flat[f"{pname}::{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars[f"{pname}::{key}"] = value
    rng_tensors, rng_meta = _rng_state()
    tensors = {FILES[0]: params, FILES[1]: flat, FILES[2]: rng_tensors}
    save_id = uuid.uuid4().hex
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
    record = {
        "format_version": FORMAT_VERSION, "step": step, **state,
        "state_keys": sorted(state),  # what the caller saved, so that a damaged state.json is noticed
        "rng": rng_meta,
        "optimizer": {"groups": groups, "param_names": param_names, "scalars": scalars},
        "shapes": {n: list(p.shape) for n, p in params.items()},
        "tensors": {f: {k: [_dtype_name(v), list(v.shape)] for k, v in ts.items()} for f, ts in tensors.items()},
        "save_id": save_id,
    }
    # the tensor files first, state.json (which names the save id they must carry) last
    files: dict[str, atomic.Writer] = {f: (lambda p, ts=ts: _save_tensors(ts, p, save_id)) for f, ts in tensors.items()}
    files[STATE] = lambda p: _write_json(p, record)
    atomic.replace_files(root / name, files)
    atomic.write_text(root / LATEST, name + "\n")
    if keep:
        for _, old in _step_folders(root)[:-keep]:
            if old.name != name:  # never the one latest names
                # renamed first, so that a crash during the deletion leaves a temporary, not a half checkpoint
                doomed = atomic.temp_path(old)
                os.rename(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
    return root / name


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from itself, its parent ``checkpoints/`` or the run's output dir."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / STATE).is_file():
            return candidate
        if (candidate / LATEST).is_file():
            name = (candidate / LATEST).read_text(encoding="utf-8").strip()
            return candidate / name
    raise FileNotFoundError(f"no checkpoint at {path}: pass a step-NNNNNN folder, its checkpoints/ "
                            f"folder or the run's output_dir (which has checkpoints/latest)")


def _damaged(folder: Path, problems: list[str]) -> CheckpointDamaged:
    more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
    return CheckpointDamaged(f"checkpoint {folder} is damaged: {'; '.join(problems[:5])}{more}. Nothing was "
                             "loaded: resume from an earlier step-* folder")


def _read_state(folder: Path) -> dict[str, Any]:
    """state.json, with every entry load_checkpoint and its caller need, or CheckpointDamaged."""
    try:
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as exc:
        raise _damaged(folder, [f"{STATE} cannot be read ({exc})"]) from exc
    if not isinstance(state, dict):
        raise _damaged(folder, [f"{STATE} holds a {type(state).__name__}, not a JSON object"])
    need = ["step", "shapes", "optimizer", "rng", *state.get("state_keys", [])]
    missing = [k for k in need if k not in state]
    opt = state.get("optimizer")
    missing += [f"optimizer.{k}" for k in ("groups", "param_names", "scalars")
                if not isinstance(opt, dict) or k not in opt]
    if missing:
        raise _damaged(folder, [f"{STATE} lacks {missing}"])
    try:  # the Python and NumPy states, tried on throw-away generators
        version, mt, gauss = state["rng"]["python"]
        random.Random().setstate((version, tuple(mt), gauss))
        name, keys, pos, has_gauss, cached = state["rng"]["numpy"]
        np.random.RandomState().set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (TypeError, ValueError, KeyError) as exc:
        raise _damaged(folder, [f"{STATE}: the Python/NumPy RNG states are invalid ({exc})"]) from exc
    return state


def _read_tensors(folder: Path, file: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of one safetensors file, or CheckpointDamaged naming it."""
    try:
        with safe_open(str(folder / file), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(folder, [f"{file} cannot be read ({exc})"]) from exc


def _problems(state: dict, files: dict[str, tuple[dict, dict]], model: torch.nn.Module,
              index: list[str]) -> list[str]:
    """Everything wrong with the three tensor files, as ``"<file>: <problem>"`` lines."""
    out: list[str] = []
    recorded = state.get("tensors")  # None in format-1 checkpoints: fewer checks are possible
    params = trainable_state(model)
    for file, (tensors, meta) in files.items():
        if recorded is not None:
            want = recorded.get(file, {})
            out += [f"{file}: tensor {k!r} is missing" for k in sorted(set(want) - set(tensors))]
            out += [f"{file}: unexpected tensor {k!r}" for k in sorted(set(tensors) - set(want))]
            for k in sorted(set(want) & set(tensors)):
                found = [_dtype_name(tensors[k]), list(tensors[k].shape)]
                if found != list(want[k]):
                    out.append(f"{file}: tensor {k!r} is {found[0]} {found[1]}, {STATE} recorded {want[k][0]} "
                               f"{want[k][1]}")
        if file == FILES[0]:  # the trainable parameters, against the model itself
            out += [f"{file}: tensor {n!r} is missing" for n in params if n not in tensors]
            for n, t in tensors.items():
                if n not in params:
                    out.append(f"{file}: unexpected tensor {n!r}")
                elif tuple(t.shape) != tuple(params[n].shape):
                    out.append(f"{file}: tensor {n!r} has shape {tuple(t.shape)}, the model's is "
                               f"{tuple(params[n].shape)}")
                elif (p := tensor_problem(t, params[n].dtype)) is not None:
                    out.append(f"{file}: tensor {n!r} {p}")
        elif file == FILES[1]:  # optimizer state: "<param name>::<key>" of known parameters
            for k, t in tensors.items():
                pname, sep, _ = k.partition("::")
                like = getattr(torch, recorded[file][k][0], None) if recorded and k in recorded.get(file, {}) else None
                if not sep or pname not in index:
                    out.append(f"{file}: tensor {k!r} belongs to no parameter of the optimizer")
                elif (p := tensor_problem(t, like)) is not None:
                    out.append(f"{file}: tensor {k!r} {p}")
        else:  # RNG states
            cpu = tensors.get("torch_cpu")
            want = torch.get_rng_state()
            if cpu is None or cpu.dtype != want.dtype or cpu.shape != want.shape:
                out.append(f"{file}: 'torch_cpu' must be a {want.dtype} tensor of shape {tuple(want.shape)}")
        if "save_id" in state and SAVE_ID in meta and meta[SAVE_ID] != state["save_id"]:
            out.append(f"{file} was written by another save than {STATE} (a re-save of this step was interrupted)")
    return list(dict.fromkeys(out))  # the record and the model can report the same missing tensor


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, param_names: list[list[str]]) -> dict[str, Any]:
    """Restore trainable weights, optimizer and RNG states; return the JSON training state.

    Everything is read and checked first (every file readable, every tensor present with
    the recorded dtype and shape, finite values, one save id); only then are the model, the
    optimizer and the RNGs changed, so on any error they are left exactly as they were.
    Raises ``CheckpointMismatch`` (naming the parameters) when ``model``'s trainable
    parameters are not the ones the checkpoint was written for, ``CheckpointDamaged``
    (naming the file) when a file is bad.
    """
    folder = resolve_checkpoint(path)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {folder} is incomplete (missing {missing}); "
                                "resume from an earlier step-* folder")
    state = _read_state(folder)
    mine = {n: list(p.shape) for n, p in trainable_state(model).items()}
    theirs = state["shapes"]
    if mine != theirs:
        only_ckpt = sorted(set(theirs) - set(mine))
        only_model = sorted(set(mine) - set(theirs))
        shape = sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n])
        parts = [f"{len(only_ckpt)} only in the checkpoint (e.g. {only_ckpt[:3]})" if only_ckpt else "",
                 f"{len(only_model)} only in the model (e.g. {only_model[:3]})" if only_model else "",
                 "different shapes for " + ", ".join(f"{n}: checkpoint {theirs[n]} vs model {mine[n]}"
                                                     for n in shape[:3]) if shape else ""]
        raise CheckpointMismatch(
            f"checkpoint {folder} was written for another model/adapter: its trainable parameters "
            f"differ from this model's ({'; '.join(p for p in parts if p)}). Resume with the same "
            f"model and adapter config that wrote it, or start a fresh run without resume_from")
    if state["optimizer"]["param_names"] != param_names:
        raise CheckpointMismatch(f"checkpoint {folder} groups the parameters differently (another "
                                 "weight_decay split?): resume with the same TrainConfig")
    if len(optimizer.param_groups) != len(param_names) or any(
            len(g["params"]) != len(names) for g, names in zip(optimizer.param_groups, param_names)):
        raise ValueError("param_names does not describe the optimizer's parameter groups: pass the names "
                         "returned with the groups the optimizer was built from")
    if len(state["optimizer"]["groups"]) != len(param_names):
        raise _damaged(folder, [f"{STATE} records {len(state['optimizer']['groups'])} optimizer groups "
                                f"for {len(param_names)} lists of parameter names"])
    files = {f: _read_tensors(folder, f) for f in FILES[:3]}
    index = [n for group in param_names for n in group]
    problems = _problems(state, files, model, index)
    problems += [f"{STATE}: optimizer value {k!r} belongs to no parameter"
                 for k in state["optimizer"]["scalars"] if k.partition("::")[0] not in index]
    if problems:
        raise _damaged(folder, problems)

    # -- everything checked: now change the optimizer, the weights and the RNGs ----------------
    weights, flat, rng = (files[f][0] for f in FILES[:3])
    scalars = state["optimizer"]["scalars"]
    opt_state: dict[int, dict[str, Any]] = {}
    for idx, pname in enumerate(index):
        entry = {k.split("::", 1)[1]: v for k, v in flat.items() if k.split("::", 1)[0] == pname}
        entry.update({k.split("::", 1)[1]: v for k, v in scalars.items() if k.split("::", 1)[0] == pname})
        if entry:
            opt_state[idx] = entry
    groups, start = [], 0
    for g, names in zip(state["optimizer"]["groups"], param_names):
        groups.append({**g, "params": list(range(start, start + len(names)))})
        start += len(names)
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})  # checks before it changes
    with torch.no_grad():
        for n, p in trainable_state(model).items():
            p.copy_(weights[n].to(p.device, p.dtype))
    _set_rng_state(rng, state["rng"])
    state["checkpoint"] = str(folder)
    return state
