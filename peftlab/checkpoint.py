"""Training checkpoints that are atomic, pickle-free and resume bit-for-bit.

A checkpoint is a folder ``<output_dir>/checkpoints/step-000040/`` holding

* ``trainable.safetensors``: every trainable parameter, by name;
* ``optimizer.safetensors``: the optimizer's per-parameter tensors, flattened to
  ``"<param name>::<state key>"`` (AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``);
* ``rng.safetensors``: torch's CPU and CUDA generator states (uint8 tensors);
* ``state.json``: step, position in the epoch, history, the TrainConfig, Python/NumPy RNG
  states, the optimizer's hyper-parameters and parameter order, the shapes of the
  trainable parameters (to refuse a checkpoint of another model clearly).

Only safetensors and JSON are read back: no pickle, no ``torch.load``. Every file is written
into a hidden temporary folder, flushed to disk, and the folder is renamed into place; only
then is the one-line ``latest`` file replaced (``os.replace`` is atomic). A crash at any point
leaves ``latest`` naming the previous complete checkpoint. Explained in
``notebooks/06_training.ipynb`` ("Checkpoints and resuming").
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "resolve_checkpoint", "CheckpointMismatch"]

LATEST = "latest"
STATE = "state.json"
FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", STATE)
FORMAT_VERSION = 1


class CheckpointMismatch(ValueError):
    """The checkpoint was written for a model with other trainable parameters."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))
    _fsync_file(path)


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
    for stale in root.glob(".tmp-*"):  # leftovers of an earlier crash
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:06d}"
    tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        params = trainable_state(model)
        _save_tensors(params, tmp / FILES[0])
        # optimizer: tensors by "<name>::<key>", everything else in JSON
        opt = optimizer.state_dict()
        flat, scalars = {}, {}
        index = [n for group in param_names for n in group]
        for idx, per_param in opt["state"].items():
            pname = index[idx]
            for key, value in per_param.items():
                if torch.is_tensor(value):
                    flat[f"{pname}::{key}"] = value
                else:
                    scalars[f"{pname}::{key}"] = value
        _save_tensors(flat, tmp / FILES[1])
        rng_tensors, rng_meta = _rng_state()
        _save_tensors(rng_tensors, tmp / FILES[2])
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
        _write_json(tmp / STATE, {
            "format_version": FORMAT_VERSION, "step": step, **state,
            "rng": rng_meta,
            "optimizer": {"groups": groups, "param_names": param_names, "scalars": scalars},
            "shapes": {n: list(p.shape) for n, p in params.items()},
        })
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    pointer = root / f".tmp-latest-{uuid.uuid4().hex[:8]}"
    pointer.write_text(name + "\n", encoding="utf-8")
    _fsync_file(pointer)
    os.replace(pointer, root / LATEST)
    if keep:
        done = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in done[:-keep]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
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


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, param_names: list[list[str]]) -> dict[str, Any]:
    """Restore trainable weights, optimizer and RNG states; return the JSON training state.

    Raises ``CheckpointMismatch`` (naming the parameters) when ``model``'s trainable
    parameters are not the ones the checkpoint was written for.
    """
    folder = resolve_checkpoint(path)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {folder} is incomplete (missing {missing}); "
                                "resume from an earlier step-* folder")
    state = json.loads((folder / STATE).read_text(encoding="utf-8"))
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
    weights = load_file(str(folder / FILES[0]))
    with torch.no_grad():
        for n, p in trainable_state(model).items():
            p.copy_(weights[n].to(p.device, p.dtype))
    flat = load_file(str(folder / FILES[1]))
    scalars = state["optimizer"]["scalars"]
    index = [n for group in param_names for n in group]
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
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    _set_rng_state(load_file(str(folder / FILES[2])), state["rng"])
    state["checkpoint"] = str(folder)
    return state
