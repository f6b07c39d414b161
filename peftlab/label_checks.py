"""What ``peftlab.train`` checks about the labels before the first step changes a weight.

Every label of the training (and eval) set is checked against the model: class ids in
[0, num_labels), token ids in [0, vocabulary) or -100 (ignored), finite numbers for
regression. A bad label otherwise fails deep inside torch after some steps have already
changed the weights. Explained in notebooks/07_training.ipynb.
"""

from __future__ import annotations

import numbers
from typing import Callable

import numpy as np
import torch
from torch import nn

from .metrics import rng_preserved

__all__ = ["check_labels", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # token labels equal to this are not predicted (torch's cross_entropy default)


def _label_rule(model: nn.Module, token_level: bool) -> tuple[int | None, str, bool]:
    """What the model's loss accepts: (limit, description, real_valued).

    Class ids (and token ids) must lie in [0, limit); token labels may also be -100. With
    ``real_valued`` (regression, multi-label, or a plain module whose loss we cannot know)
    only finiteness is checked.
    """
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None, "", True
    if getattr(cfg, "problem_type", None) in ("regression", "multi_label_classification") or (
            not token_level and getattr(cfg, "num_labels", 2) == 1):
        return None, "", True
    if token_level:
        try:
            head = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            head = None
        if head is not None:  # a language-model head: the labels are token ids
            width = int(getattr(head, "out_features", None) or head.weight.shape[0])
            return width, f"vocabulary of {width} tokens", False
    return int(cfg.num_labels), f"num_labels={cfg.num_labels}", False


def _column(data) -> list | None:
    """The ``labels`` of every row of a tokenised dataset (None if the rows have none)."""
    if hasattr(data, "column_names"):  # a datasets.Dataset; as_loader has checked the column exists
        return list(data.with_format("python")["labels"])
    rows = list(data)
    if not rows or not isinstance(rows[0], dict) or "labels" not in rows[0]:
        return None
    return [row.get("labels") for row in rows]


def _flatten(column: list, where: str) -> tuple[list, np.ndarray, bool]:
    """(values, row of each value, token_level) of a labels column."""
    def is_seq(v):
        return isinstance(v, (list, tuple))

    column = [v.tolist() if torch.is_tensor(v) or isinstance(v, np.ndarray) else v for v in column]
    if not is_seq(column[0]):  # one label per row
        return column, np.arange(len(column)), False
    odd = next((i for i, v in enumerate(column) if not is_seq(v)), None)
    if odd is not None:
        raise ValueError(f"{where} row {odd} has the label {column[odd]!r} but row 0 has a list of token "
                         "labels: give every row one label per token (-100 where nothing is predicted)")
    rows = np.repeat(np.arange(len(column)), [len(v) for v in column])
    return [x for v in column for x in v], rows, True


def _check_values(values, where: str, token_level: bool, rule, at: Callable[[int], str]) -> None:
    """Raise a ValueError naming the first unusable label (``at(i)`` says where value i sits) and the fix."""
    limit, what, real_valued = rule
    kind = "token label" if token_level else "label"
    fix = ("token labels are token ids (or -100 where nothing is predicted): tokenise the targets with "
           "the model's tokenizer" if token_level else
           "labels are class ids 0, 1, ...: map names to ids first, e.g. ds.class_encode_column('labels')")
    arr = np.asarray(values)
    if arr.dtype.kind not in "biuf":  # strings, None, nested lists
        i = next((i for i, v in enumerate(values) if not isinstance(v, numbers.Real)), 0)
        raise ValueError(f"{where} {kind} {values[i]!r} ({at(i)}) is not a number: {fix}")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if not real_valued:
        bad |= arr != np.floor(arr)  # a class or token id is a whole number (the collator would truncate)
        fix += "; real-valued targets need a regression model (num_labels=1)"
    if bad.any():
        i = int(np.argmax(bad))
        need = "a finite number" if real_valued else "an integer"
        raise ValueError(f"{where} {kind} {values[i]!r} ({at(i)}) is not {need}: {fix}")
    if real_valued or limit is None:
        return
    ok = (arr >= 0) & (arr < limit)
    if token_level:
        ok |= arr == IGNORE_INDEX
    if ok.all():
        return
    i = int(np.argmin(ok))
    v = int(arr[i])
    if token_level:
        need = f"-100 or in [0, {limit})"
        fix = (f"use -100 (not {v}) to mark positions that are not predicted" if v < 0 else
               "tokenise with this model's own tokenizer, or resize its embeddings to the tokenizer")
    else:
        need = f"in [0, {limit})"
        fix = f"remap the labels to 0..{limit - 1}" + (f", or build the model with num_labels={v + 1}"
                                                      if v >= limit else "")
    raise ValueError(f"{where} {kind} {v} ({at(i)}) is out of range for this model ({what}): "
                     f"it must be {need}; {fix}")


def _loader_generators(loader) -> list[torch.Generator]:
    """The generators that iterating ``loader`` advances (its own, its samplers')."""
    batches = getattr(loader, "batch_sampler", None)
    owners = (loader, getattr(loader, "sampler", None), batches, getattr(batches, "sampler", None))
    gens: list[torch.Generator] = []
    for owner in owners:
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in gens):
            gens.append(g)
    return gens


def _check_loader(model: nn.Module, loader, where: str) -> set[bool]:
    """Check a DataLoader's labels batch by batch; return the token_level flags seen."""
    seen: set[bool] = set()
    gens = _loader_generators(loader)
    states = [g.get_state() for g in gens]
    try:
        with rng_preserved():  # a loader without a generator draws its seeds from torch's global one
            for k, batch in enumerate(loader):
                y = batch.get("labels") if isinstance(batch, dict) else None
                if y is None:
                    continue
                y = torch.as_tensor(y)
                token_level = y.dim() >= 2  # (B, T) token labels, (B,) one label per example
                seen.add(token_level)
                rule = _label_rule(model, token_level)
                if not rule[2] and (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
                    raise ValueError(f"{where} batch {k} has labels of dtype {y.dtype}: class and token ids "
                                     "must be an integer tensor; collate them with torch.tensor(labels, "
                                     "dtype=torch.long)")
                _check_values(y.detach().cpu().reshape(-1).numpy(), where, token_level, rule,
                              lambda i, k=k: f"batch {k}")
    finally:
        for g, state in zip(gens, states):  # the run's first epoch then sees the order it would have
            g.set_state(state)
    return seen


def check_labels(model: nn.Module, data, where: str = "train_data") -> str | None:
    """Check every label of ``data`` against ``model``; return ``"classification"``, ``"token"`` or None.

    Class labels must be integers in [0, num_labels); token labels integers in [0, vocab size)
    for a language-model head (or [0, num_labels) for token classification), or -100 (ignored).
    Regression and multi-label models only need finite numbers. A tokenised dataset's column is
    read directly; a DataLoader is iterated once (no model call) with every random state it
    draws from put back, so the run's data order and dropout masks are those of an unchecked run.
    ``train`` (``notebooks/07_training.ipynb``) calls this before the first step, so a bad label
    in the last batch fails before any weight has changed.
    """
    from torch.utils.data import DataLoader

    if isinstance(data, DataLoader):
        seen = _check_loader(model, data, where)
        if len(seen) > 1:
            raise ValueError(f"{where} mixes batches of one label per example with batches of token "
                             "labels: give every batch the same kind of labels")
        token_level = seen.pop() if seen else None
    else:
        column = _column(data)
        if column is None:
            return None
        values, rows, token_level = _flatten(column, where)
        _check_values(values, where, token_level, _label_rule(model, token_level), lambda i: f"row {rows[i]}")
    return None if token_level is None else "token" if token_level else "classification"


