"""A small, readable training loop for any peftlab (or plain transformers) model.

``train(model, train_data, eval_data, TrainConfig(...))`` implements the practice the course
teaches in ``notebooks/06_training.ipynb``:

* AdamW (Loshchilov & Hutter, 2019) over the *trainable* parameters only, in two groups:
  weight decay on matrices, none on biases and normalisation weights;
* linear warm-up then linear, cosine (Loshchilov & Hutter, 2017, "SGDR") or constant decay,
  written as the pure function ``lr_factor`` so that it can be plotted and tested;
* gradient clipping by global norm, gradient accumulation (equal to the big-batch gradient for
  mean-reduced losses over equal-sized micro-batches), ``torch.amp`` autocast (bf16 on CPU or
  CUDA, fp16 on CUDA with a ``GradScaler``);
* tqdm progress bars, TensorBoard scalars, evaluation every epoch (or every N steps);
* atomic checkpoints (``peftlab.checkpoint``) and ``resume_from=`` that reproduces the weights
  of an uninterrupted run exactly;
* fail early, change nothing: the config's numbers must be finite, the labels of the whole
  training (and eval) set are checked against the model before the first step, and a
  non-finite loss or gradient norm stops the run before that update is applied;
* evaluation never moves the global random state, so a run with ``eval_data`` ends with the
  same weights as the run without it;
* ``accelerate``: under ``accelerate launch`` (or with ``use_accelerate=True``) the same call
  trains data-parallel through ``accelerate.Accelerator``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from peftlab import checkpoint as ckpt
from peftlab import runtime
from peftlab.metrics import PeakMemory, as_loader, evaluate, rng_preserved

__all__ = ["TrainConfig", "TrainResult", "train", "lr_factor", "param_groups", "warmup_steps",
           "check_labels"]

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
# what peftlab.metrics.evaluate reports, by kind of eval set
CLASSIFICATION_METRICS = ("accuracy", "f1", "roc_auc", "loss")
LM_METRICS = ("loss", "perplexity", "token_accuracy")
METRICS = CLASSIFICATION_METRICS + LM_METRICS[1:]
_LOWER_IS_BETTER = ("loss", "perplexity")
IGNORE_INDEX = -100  # token labels equal to this are not predicted (torch's cross_entropy default)


@dataclass
class TrainConfig:
    """Everything ``train`` needs; validated on construction (errors say what to change)."""

    lr: float = 5e-4  # peak learning rate; ~1e-3 for LoRA/heads, ~5e-5 for full fine-tuning
    batch_size: int = 16  # examples per micro-batch (ignored when you pass a DataLoader)
    epochs: int = 1  # passes over the training data (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps in total; overrides epochs
    warmup: float | int = 0.06  # float in [0, 1): share of the steps; int >= 1: steps
    schedule: str = "linear"  # decay after warm-up: linear | cosine | constant
    weight_decay: float = 0.01  # AdamW decay on matrices (not on biases and norms)
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None: no clipping
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: str = "fp32"  # fp32 | bf16 (CPU or CUDA) | fp16 (CUDA only, with GradScaler)
    eval_every: int | None = None  # evaluate every N steps; None: after each epoch
    eval_batch_size: int = 128  # batch size of evaluation (no gradients: big batches are cheap)
    group_by_length: bool = True  # batch similar lengths together (peftlab.data.LengthGroupedBatches)
    metric: str = "accuracy"  # picks the best step, one of METRICS; "accuracy" means "loss" on LM sets
    checkpoint_every: int | None = None  # save a checkpoint every N steps (needs output_dir)
    keep_checkpoints: int = 2  # complete checkpoints kept on disk
    output_dir: str | None = None  # checkpoints/ and tensorboard/ go here
    seed: int = 0  # seeds dropout and the data order
    log_tensorboard: bool = False  # write TensorBoard scalars to output_dir/tensorboard
    log_every: int = 10  # steps between TensorBoard/progress-bar updates
    progress: bool = True  # tqdm progress bar (notebook widget or terminal)
    device: str | None = None  # None: the model's device (or accelerate's)
    use_accelerate: bool | None = None  # None: only when launched by `accelerate launch`

    def __post_init__(self) -> None:
        def fail(name, value, need, fix):
            raise ValueError(f"TrainConfig.{name} must be {need}, got {value!r}: {fix}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_finite(v):  # a real number that is not nan or +-inf (bools are not numbers here)
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not (is_finite(self.lr) and self.lr > 0):
            fail("lr", self.lr, "a positive number", "use e.g. 1e-3 for LoRA or 5e-5 for full fine-tuning")
        for name in ("batch_size", "grad_accum", "eval_batch_size", "log_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not is_int(v) or v <= 0:
                fail(name, v, "a positive int", "use e.g. 16 (batch_size) or 1 (grad_accum)")
        if self.max_steps is None and (not is_int(self.epochs) or self.epochs <= 0):
            fail("epochs", self.epochs, "a positive int", "use e.g. epochs=1, or set max_steps")
        for name in ("max_steps", "eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v <= 0):
                fail(name, v, "None or a positive int", f"remove {name} or use e.g. {name}=100")
        w = self.warmup
        if isinstance(w, bool) or not ((is_int(w) and w >= 0) or (isinstance(w, float) and 0 <= w < 1)):
            fail("warmup", w, "a float in [0, 1) (share of steps) or an int >= 0 (steps)",
                 "use e.g. warmup=0.06 or warmup=50")
        if self.schedule not in SCHEDULES:
            fail("schedule", self.schedule, f"one of {SCHEDULES}", "use 'linear'")
        if self.precision not in PRECISIONS:
            fail("precision", self.precision, f"one of {PRECISIONS}", "use 'fp32' on a CPU")
        if not (is_finite(self.weight_decay) and self.weight_decay >= 0):
            fail("weight_decay", self.weight_decay, "a finite number >= 0", "use 0.01 or 0.0")
        if self.max_grad_norm is not None and not (is_finite(self.max_grad_norm) and self.max_grad_norm > 0):
            fail("max_grad_norm", self.max_grad_norm, "None or a finite number > 0",
                 "use 1.0, or None to switch clipping off")
        if self.metric not in METRICS:
            fail("metric", self.metric, f"one of {METRICS}",
                 "use 'accuracy' (or 'f1', 'roc_auc') for classification, 'loss' or 'perplexity' for LMs")
        if self.checkpoint_every and not self.output_dir:
            fail("output_dir", self.output_dir, "a folder when checkpoint_every is set",
                 "pass output_dir='runs/my-run'")
        if self.log_tensorboard and not self.output_dir:
            fail("output_dir", self.output_dir, "a folder when log_tensorboard=True",
                 "pass output_dir='runs/my-run'")
        if not is_int(self.seed) or self.seed < 0:
            fail("seed", self.seed, "a non-negative int", "use seed=0")


@dataclass
class TrainResult:
    """What ``train`` measured; ``history`` rows are per optimizer step."""

    history: list[dict[str, float]] = field(default_factory=list)  # step, epoch, loss, lr, grad_norm
    evals: list[dict[str, float]] = field(default_factory=list)  # step, epoch and eval metrics
    metric: str = "accuracy"
    best_metric: float | None = None
    best_step: int | None = None
    steps: int = 0
    train_seconds: float = 0.0  # wall time of the optimizer steps (without evaluation)
    eval_seconds: float = 0.0
    step_seconds: float = float("nan")  # median seconds per optimizer step
    peak_memory_bytes: int = 0  # CUDA allocator peak, or sampled process RSS peak on the CPU
    extra_memory_bytes: int = 0  # peak minus what was in use when training started
    checkpoints: list[str] = field(default_factory=list)
    resumed_from: str | None = None

    @property
    def final(self) -> dict[str, float]:
        """The last evaluation (empty without eval data)."""
        return self.evals[-1] if self.evals else {}


def warmup_steps(warmup: float | int, total: int) -> int:
    """Warm-up length in steps: a share of ``total`` (float) or a count (int)."""
    return int(round(warmup * total)) if isinstance(warmup, float) else int(warmup)


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "linear") -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based) of ``total``.

    Warm-up: ``(step + 1) / warmup`` for the first ``warmup`` steps (so step 0 already moves).
    Then with progress ``p = (step - warmup) / (total - warmup)`` in [0, 1):
    linear ``1 - p``, cosine ``(1 + cos(pi p)) / 2``, constant ``1``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - p)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))
    return 1.0


def _no_decay(module: nn.Module, pname: str) -> bool:
    return pname == "bias" or pname.endswith("_bias") or "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict], list[list[str]]]:
    """AdamW groups over trainable parameters: [decayed, not decayed], and their names."""
    decay, plain, seen = [], [], set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            (plain if _no_decay(module, pname) else decay).append((full, p))
    if not decay and not plain:
        raise ValueError("the model has no trainable parameters: inject an adapter "
                         "(peftlab.inject) or set requires_grad=True on what you want to train")
    groups = [{"params": [p for _, p in decay], "weight_decay": weight_decay},
              {"params": [p for _, p in plain], "weight_decay": 0.0}]
    return groups, [[n for n, _ in decay], [n for n, _ in plain]]


def _launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_MIXED_PRECISION" in os.environ


def _make_loader(data, config: TrainConfig, pad_id: int, *, shuffle: bool):
    return as_loader(data, config.batch_size, shuffle=shuffle, seed=config.seed, pad_token_id=pad_id,
                     group_by_length=config.group_by_length)


def _seed_epoch(loader, seed: int, epoch: int) -> None:
    """Same data order for an epoch whether the run is fresh or resumed."""
    for owner in (loader, getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch)
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed + epoch)


# --- labels, checked before anything changes ----------------------------------------------

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
    ``train`` (``notebooks/06_training.ipynb``) calls this before the first step, so a bad label
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


def _eval_metric(metric: str, kind: str | None) -> str:
    """The name in ``evaluate``'s scores that picks the best step, for an eval set of ``kind``."""
    valid = LM_METRICS if kind == "token" else CLASSIFICATION_METRICS
    if kind is None or metric in valid:
        return metric
    if kind == "token" and metric == "accuracy":
        return "loss"  # the default; one-label accuracy means nothing for an LM set, so its loss counts
    what = "token labels (a language-model set)" if kind == "token" else "one label per example"
    raise ValueError(f"TrainConfig.metric={metric!r} is not measured on eval_data with {what}: "
                     f"use one of {valid}")


def train(model: nn.Module, train_data, eval_data=None, config: TrainConfig | None = None, *,
          resume_from: str | os.PathLike | None = None,
          on_evaluate: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    """Train ``model`` in place and return a ``TrainResult``.

    ``train_data``/``eval_data``: tokenised datasets (``input_ids``, ``attention_mask``,
    ``labels``; see ``peftlab.data.tokenize_classification``) or DataLoaders of such batches.
    ``resume_from``: a checkpoint folder (or the output_dir of an earlier run) to continue.
    ``on_evaluate(scores)``: called after every evaluation with the step and the metrics (the
    Optuna helper reports to its trial and prunes from here by raising).
    """
    config = config or TrainConfig()
    if isinstance(train_data, (str, bytes)) or train_data is None:
        raise TypeError("train_data must be a tokenised dataset or a DataLoader, got "
                        f"{type(train_data).__name__}")
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    loader = _make_loader(train_data, config, pad_id, shuffle=True)
    if len(loader) == 0:
        raise ValueError("train_data yields no batches: pass at least one example")
    # every label is checked now, so that a bad one fails before the first step changes a weight
    check_labels(model, train_data, "train_data")
    metric = config.metric
    if eval_data is not None:
        eval_loader = as_loader(eval_data, config.eval_batch_size, pad_token_id=pad_id)
        metric = _eval_metric(config.metric, check_labels(model, eval_data, "eval_data"))
        eval_data = eval_loader
    runtime.use_physical_cores()

    use_acc = config.use_accelerate if config.use_accelerate is not None else _launched_distributed()
    accelerator = None
    if use_acc:
        from accelerate import Accelerator

        # without CUDA, torchrun-launched ranks only form a (gloo) process group with cpu=True
        cpu = config.device == "cpu" or not torch.cuda.is_available()
        accelerator = Accelerator(cpu=cpu, mixed_precision={"fp32": "no"}.get(config.precision,
                                                                              config.precision))
        device = accelerator.device
    else:
        device = torch.device(config.device) if config.device else next(model.parameters()).device
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError(f"TrainConfig.precision='fp16' needs a CUDA device (this run is on {device}): "
                         "use precision='bf16' or 'fp32' on the CPU")
    main = accelerator is None or accelerator.is_main_process
    if not resume_from:
        torch.manual_seed(config.seed)
    model.to(device)
    groups, names = param_groups(model, config.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=config.lr)

    steps_per_epoch = math.ceil(len(loader) / config.grad_accum)
    if accelerator is not None:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        steps_per_epoch = math.ceil(len(loader) / config.grad_accum)
    total = config.max_steps or config.epochs * steps_per_epoch
    warm = warmup_steps(config.warmup, total)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" and accelerator is None else None
    raw = accelerator.unwrap_model(model) if accelerator is not None else model

    result = TrainResult(metric=metric)
    step, epoch, skip = 0, 0, 0
    if resume_from:
        state = ckpt.load_checkpoint(resume_from, raw, getattr(optimizer, "optimizer", optimizer), names)
        old = state.get("config", {})
        for key in ("batch_size", "grad_accum", "seed", "max_steps", "epochs", "schedule", "warmup", "lr"):
            if key in old and old[key] != getattr(config, key):
                warnings.warn(f"resuming with {key}={getattr(config, key)!r} but the checkpoint used "
                              f"{old[key]!r}: the run will not match an uninterrupted one", stacklevel=2)
        step, epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]
        result.history, result.evals = state["history"], state["evals"]
        result.best_metric, result.best_step = state["best_metric"], state["best_step"]
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        result.resumed_from = state["checkpoint"]

    writer = None
    if config.log_tensorboard and main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(Path(config.output_dir) / "tensorboard"))
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not (config.progress and main),
               dynamic_ncols=True)
    shown: dict[str, str] = {}  # what the bar prints after the rate: latest loss, latest eval

    def show(key: str, text: str) -> None:
        shown[key] = text
        bar.set_postfix_str(" | ".join(shown.values()), refresh=False)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    step_times: list[float] = []

    def run_eval() -> None:
        if eval_data is None:
            return
        with rng_preserved():  # evaluate() preserves it too; this also covers on_evaluate
            evaluate_now()

    def evaluate_now() -> None:
        t0 = time.perf_counter()
        scores = evaluate(raw, eval_data, autocast_dtype=amp_dtype)
        result.eval_seconds += time.perf_counter() - t0
        result.evals.append({"step": step, "epoch": epoch, **scores})
        if metric not in scores:
            raise KeyError(f"TrainConfig.metric={metric!r} is not among the eval scores {sorted(scores)}: "
                           "use one of those")
        name = metric
        value = scores[name]
        better = (result.best_metric is None or
                  (value < result.best_metric if name in _LOWER_IS_BETTER else value > result.best_metric))
        if better:
            result.best_metric, result.best_step = value, step
        if writer is not None:
            for k, v in scores.items():
                writer.add_scalar(f"eval/{k}", v, step)
        show("eval", f"eval {name} {value:.4f}")
        if on_evaluate is not None:
            on_evaluate(result.evals[-1])

    def save(next_epoch: int, next_batch: int) -> None:
        if main:
            state = {"epoch": next_epoch, "batch_in_epoch": next_batch, "history": result.history,
                     "evals": result.evals, "best_metric": result.best_metric,
                     "best_step": result.best_step, "config": dataclasses.asdict(config),
                     "scaler": scaler.state_dict() if scaler is not None else None}
            path = ckpt.save_checkpoint(Path(config.output_dir) / "checkpoints", step, raw,
                                        getattr(optimizer, "optimizer", optimizer), names, state,
                                        keep=config.keep_checkpoints)
            result.checkpoints.append(str(path))
        if accelerator is not None:
            accelerator.wait_for_everyone()

    model.train()
    memory = PeakMemory(device)
    with memory, contextlib.closing(bar):  # the bar closes on an error too
        while step < total:
            _seed_epoch(loader, config.seed, epoch)
            n_batches = len(loader)
            finished_epoch = True
            t_step = time.perf_counter()
            loss_sum = 0.0
            for b, batch in enumerate(loader):
                if b < skip:
                    continue
                start = (b // config.grad_accum) * config.grad_accum
                window = min(config.grad_accum, n_batches - start)
                last = b + 1 - start == window
                batch = {k: v.to(device) for k, v in batch.items()}
                sync = (contextlib.nullcontext() if accelerator is None or last
                        else accelerator.no_sync(model))
                autocast = (torch.autocast(device.type, dtype=amp_dtype)
                            if amp_dtype is not None and accelerator is None else contextlib.nullcontext())
                with sync, autocast:
                    out = model(**batch)
                    if getattr(out, "loss", None) is None:
                        raise ValueError("the model returned no loss: the batches need a 'labels' entry")
                    loss = out.loss / window
                value = float(loss.detach())
                if not math.isfinite(value):  # stop before this step's update reaches the weights
                    optimizer.zero_grad(set_to_none=True)
                    raise FloatingPointError(
                        f"the training loss is {float(out.loss.detach())} at step {step + 1} (epoch {epoch}, "
                        f"batch {b}): stopped before that update, so the weights are those after step "
                        f"{step}. Lower lr (now {config.lr:g}), keep max_grad_norm set, use "
                        f"precision='fp32' (now {config.precision!r}), or look for bad inputs in that batch")
                if accelerator is not None:
                    accelerator.backward(loss)
                elif scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                loss_sum += value
                if not last:
                    continue
                factor = lr_factor(step, total, warm, config.schedule)
                for g in optimizer.param_groups:
                    g["lr"] = config.lr * factor
                if scaler is not None:
                    scaler.unscale_(optimizer)
                clip = config.max_grad_norm or float("inf")
                norm = (accelerator.clip_grad_norm_(params, clip) if accelerator is not None
                        else torch.nn.utils.clip_grad_norm_(params, clip))
                # fp16's loss scaling overflows now and then by design (the scaler skips that step);
                # anywhere else a nan/inf gradient would write nan into the weights
                if config.precision != "fp16" and not math.isfinite(float(norm)):
                    optimizer.zero_grad(set_to_none=True)
                    raise FloatingPointError(
                        f"the gradient norm is {float(norm)} at step {step + 1} (epoch {epoch}) although the "
                        f"loss was finite ({loss_sum:.4g}): stopped before that update, so the weights are "
                        f"those after step {step}. Lower lr (now {config.lr:g}) or look for an operation "
                        "that overflows in the backward pass (e.g. a log or a division near 0)")
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                now = time.perf_counter()
                step_times.append(now - t_step)
                row = {"step": step, "epoch": epoch, "loss": loss_sum, "lr": config.lr * factor,
                       "grad_norm": float(norm)}
                result.history.append(row)
                loss_sum = 0.0
                bar.update(1)
                if writer is not None and step % config.log_every == 0:
                    for k in ("loss", "lr", "grad_norm"):
                        writer.add_scalar(f"train/{k}", row[k], step)
                if step % config.log_every == 0:
                    show("loss", f"loss {row['loss']:.4f}")
                end_of_epoch = b + 1 == n_batches
                if (config.eval_every and step % config.eval_every == 0) or (
                        end_of_epoch and not config.eval_every):
                    run_eval()
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    save(epoch + 1 if end_of_epoch else epoch, 0 if end_of_epoch else b + 1)
                t_step = time.perf_counter()
                if step >= total:
                    finished_epoch = end_of_epoch
                    break
            skip = 0
            if finished_epoch:
                epoch += 1
    if eval_data is not None and (not result.evals or result.evals[-1]["step"] != step):
        run_eval()
    if writer is not None:
        writer.close()
    model.eval()
    done = step_times[1:] or step_times  # the first step pays for lazy initialisation
    result.steps = step
    result.train_seconds = float(sum(step_times))
    result.step_seconds = float(sorted(done)[len(done) // 2]) if done else float("nan")
    result.peak_memory_bytes, result.extra_memory_bytes = memory.peak, memory.extra
    return result
