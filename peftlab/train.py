"""A small, readable training loop for any peftlab (or plain transformers) model.

``train(model, train_data, eval_data, TrainConfig(...))`` implements the practice the course
teaches in ``notebooks/07_training.ipynb``:

* AdamW (Loshchilov & Hutter, 2019) over the *trainable* parameters only, in two groups:
  weight decay on matrices, none on biases and normalisation weights; with
  ``loraplus_ratio`` a third group, the LoRA B matrices at ``lr * loraplus_ratio`` (LoRA+,
  Hayou et al. 2024, arXiv:2402.12354); with ``head_lr`` the trained copies of
  ``modules_to_save`` (a classification head) at their own peak rate, on the same schedule;
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
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from peftlab import checkpoint as ckpt
from peftlab import runtime
from peftlab.label_checks import check_labels
from peftlab.metrics import PeakMemory, as_loader, evaluate, rng_preserved
from peftlab.wrappers import is_saved_copy

__all__ = ["TrainConfig", "TrainResult", "train", "lr_factor", "param_groups", "warmup_steps",
           "check_labels"]

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
# what peftlab.metrics.evaluate reports, by kind of eval set
CLASSIFICATION_METRICS = ("accuracy", "f1", "roc_auc", "loss")
LM_METRICS = ("loss", "perplexity", "token_accuracy")
METRICS = CLASSIFICATION_METRICS + LM_METRICS[1:]
_LOWER_IS_BETTER = ("loss", "perplexity")


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
    # LoRA+ (Hayou et al. 2024): the lora_B matrices train at lr * ratio, all else at lr; the paper
    # recommends ~16. None: one learning rate for everything
    loraplus_ratio: float | None = None
    # peak lr of the modules_to_save copies (a new classification head), on the same schedule: a fresh
    # linear head and the adapter rarely want the same rate (prefix-tuning: ~5e-2 flat, the head ~1e-2).
    # None: lr
    head_lr: float | None = None
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
        r = self.loraplus_ratio
        if r is not None and not (is_finite(r) and r > 0):
            fail("loraplus_ratio", r, "None or a finite number > 0",
                 "use e.g. 16 (LoRA+'s recommendation: B learns 16x faster than A), or None for one learning rate")
        if self.head_lr is not None and not (is_finite(self.head_lr) and self.head_lr > 0):
            fail("head_lr", self.head_lr, "None or a positive number",
                 "use e.g. 1e-2 (what a fresh classification head trains at), or None to train it at lr")
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


def _is_lora_b(full_name: str) -> bool:
    return "lora_B" in full_name.split(".")  # <layer>.lora_B.<adapter>.weight (peftlab.lora's naming rule)


def _head_ratio(config: TrainConfig) -> float | None:
    return None if config.head_lr is None else config.head_lr / config.lr


def param_groups(model: nn.Module, weight_decay: float, loraplus_ratio: float | None = None,
                 head_lr_ratio: float | None = None) -> tuple[list[dict], list[list[str]]]:
    """AdamW groups over trainable parameters: [decayed, not decayed], and their names.

    With ``loraplus_ratio`` (LoRA+, Hayou et al. 2024) the trainable ``lora_B`` matrices leave the
    decayed group for a third one, ``{"lr_scale": loraplus_ratio}`` (decayed too): ``train`` sets
    each group's learning rate to the scheduled lr times its ``lr_scale`` (1 where absent).
    With ``head_lr_ratio`` the ``modules_to_save`` copies' parameters go to two more groups
    (decayed, not decayed) with ``{"lr_scale": head_lr_ratio}``.
    Raises ``ValueError`` if a ratio is given but the model trains nothing it would scale.
    """
    decay, plain, b_mats, head_decay, head_plain, seen = [], [], [], [], [], set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            if loraplus_ratio is not None and _is_lora_b(full):
                b_mats.append((full, p))
            elif head_lr_ratio is not None and is_saved_copy(full):
                (head_plain if _no_decay(module, pname) else head_decay).append((full, p))
            else:
                (plain if _no_decay(module, pname) else decay).append((full, p))
    if not decay and not plain and not b_mats and not head_decay and not head_plain:
        raise ValueError("the model has no trainable parameters: inject an adapter "
                         "(peftlab.inject) or set requires_grad=True on what you want to train")
    groups = [{"params": [p for _, p in decay], "weight_decay": weight_decay},
              {"params": [p for _, p in plain], "weight_decay": 0.0}]
    names = [[n for n, _ in decay], [n for n, _ in plain]]
    if loraplus_ratio is not None:
        if not b_mats:
            raise ValueError(
                f"TrainConfig.loraplus_ratio={loraplus_ratio!r} scales the learning rate of LoRA's B matrices, but "
                f"{type(model).__name__} trains none (no trainable parameter named '*.lora_B.*'): inject a LoRA "
                "adapter and make it the active one (peftlab.inject(model, LoRAConfig(...))), or set "
                "loraplus_ratio=None")
        groups.append({"params": [p for _, p in b_mats], "weight_decay": weight_decay, "lr_scale": loraplus_ratio})
        names.append([n for n, _ in b_mats])
    if head_lr_ratio is not None:
        if not head_decay and not head_plain:
            raise ValueError(
                f"TrainConfig.head_lr sets the learning rate of the modules_to_save copies (a classification head), "
                f"but {type(model).__name__} trains none (no trainable parameter named '*.modules_to_save.*'): "
                "inject with e.g. modules_to_save=('classifier',), or set head_lr=None")
        for part, wd in ((head_decay, weight_decay), (head_plain, 0.0)):
            groups.append({"params": [p for _, p in part], "weight_decay": wd, "lr_scale": head_lr_ratio})
            names.append([n for n, _ in part])
    return groups, names


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

    The steps, in order (each a method of ``_Run``): check the data, place the model and build
    the optimizer, resume, then per batch forward + backward, per window an optimizer step,
    logging, evaluation and checkpoints.
    """
    config = config or TrainConfig()
    if config.loraplus_ratio is not None or config.head_lr is not None:  # refuse a model with nothing to scale
        param_groups(model, config.weight_decay, config.loraplus_ratio, _head_ratio(config))  # before it changes
    run = _Run(model, config, on_evaluate)
    run.check_data(train_data, eval_data)
    run.prepare(resuming=bool(resume_from))
    if resume_from:
        run.resume(resume_from)
    return run.loop()


class _Run:
    """The state of one ``train()`` call, and its steps as methods."""

    def __init__(self, model: nn.Module, config: TrainConfig, on_evaluate) -> None:
        self.model, self.raw, self.config, self.on_evaluate = model, model, config, on_evaluate
        self.step = self.epoch = self.skip = 0
        self.eval_data = None
        self.accelerator = self.scaler = self.writer = None
        self.step_times: list[float] = []
        self.shown: dict[str, str] = {}  # what the bar prints after the rate: latest loss, latest eval
        self.resumed = False

    # -- before the first step ------------------------------------------------------------
    def check_data(self, train_data, eval_data) -> None:
        """Loaders for both sets; every label checked now, so a bad one fails before a weight changes."""
        config, model = self.config, self.model
        if isinstance(train_data, (str, bytes)) or train_data is None:
            raise TypeError("train_data must be a tokenised dataset or a DataLoader, got "
                            f"{type(train_data).__name__}")
        self.pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
        self.loader = _make_loader(train_data, config, self.pad_id, shuffle=True)
        if len(self.loader) == 0:
            raise ValueError("train_data yields no batches: pass at least one example")
        check_labels(model, train_data, "train_data")
        self.metric = config.metric
        if eval_data is not None:
            self.eval_data = as_loader(eval_data, config.eval_batch_size, pad_token_id=self.pad_id)
            self.metric = _eval_metric(config.metric, check_labels(model, eval_data, "eval_data"))
        self.result = TrainResult(metric=self.metric)

    def prepare(self, resuming: bool = False) -> None:
        """Threads, device (or ``accelerate``), the seeded start, optimizer, schedule, precision."""
        config = self.config
        runtime.use_physical_cores()
        use_acc = config.use_accelerate if config.use_accelerate is not None else _launched_distributed()
        if use_acc:
            from accelerate import Accelerator

            # without CUDA, torchrun-launched ranks only form a (gloo) process group with cpu=True
            cpu = config.device == "cpu" or not torch.cuda.is_available()
            self.accelerator = Accelerator(cpu=cpu, mixed_precision={"fp32": "no"}.get(config.precision,
                                                                                       config.precision))
            self.device = self.accelerator.device
        else:
            self.device = torch.device(config.device) if config.device else next(self.model.parameters()).device
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"TrainConfig.precision='fp16' needs a CUDA device (this run is on {self.device}): "
                             "use precision='bf16' or 'fp32' on the CPU")
        self.main = self.accelerator is None or self.accelerator.is_main_process
        if not resuming:  # a resumed run gets the generators' states from its checkpoint instead
            torch.manual_seed(config.seed)
        self.model.to(self.device)
        groups, self.names = param_groups(self.model, config.weight_decay, config.loraplus_ratio,
                                          _head_ratio(config))
        self.lr_scales = [g.pop("lr_scale", 1.0) for g in groups]  # LoRA+ / head groups: their lr multiplier
        self.optimizer = torch.optim.AdamW([{**g, "lr": config.lr * s} for g, s in zip(groups, self.lr_scales)],
                                           lr=config.lr)
        if self.accelerator is not None:
            self.model, self.optimizer, self.loader = self.accelerator.prepare(self.model, self.optimizer, self.loader)
            self.raw = self.accelerator.unwrap_model(self.model)
        steps_per_epoch = math.ceil(len(self.loader) / config.grad_accum)
        self.total = config.max_steps or config.epochs * steps_per_epoch
        self.warm = warmup_steps(config.warmup, self.total)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
        if config.precision == "fp16" and self.accelerator is None:
            self.scaler = torch.amp.GradScaler("cuda")
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def resume(self, path: str | os.PathLike) -> None:
        """Weights, optimizer state, position in the data and history from a checkpoint."""
        config, result = self.config, self.result
        state = ckpt.load_checkpoint(path, self.raw, self._inner_optimizer(), self.names)
        old = state.get("config", {})
        for key in ("batch_size", "grad_accum", "seed", "max_steps", "epochs", "schedule", "warmup", "lr",
                    "loraplus_ratio", "head_lr"):
            if key in old and old[key] != getattr(config, key):
                warnings.warn(f"resuming with {key}={getattr(config, key)!r} but the checkpoint used "
                              f"{old[key]!r}: the run will not match an uninterrupted one", stacklevel=3)
        self.step, self.epoch, self.skip = state["step"], state["epoch"], state["batch_in_epoch"]
        result.history, result.evals = state["history"], state["evals"]
        result.best_metric, result.best_step = state["best_metric"], state["best_step"]
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        result.resumed_from = state["checkpoint"]

    def _inner_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it

    # -- one batch, one update ------------------------------------------------------------
    def forward_backward(self, batch: dict, window: int, last: bool, b: int) -> float:
        """Loss of one micro-batch (divided by the accumulation window), backpropagated."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        acc = self.accelerator
        sync = contextlib.nullcontext() if acc is None or last else acc.no_sync(self.model)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype)
                    if self.amp_dtype is not None and acc is None else contextlib.nullcontext())
        with sync, autocast:
            out = self.model(**batch)
            if getattr(out, "loss", None) is None:
                raise ValueError("the model returned no loss: the batches need a 'labels' entry")
            loss = out.loss / window
        value = float(loss.detach())
        if not math.isfinite(value):  # stop before this step's update reaches the weights
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"the training loss is {float(out.loss.detach())} at step {self.step + 1} (epoch {self.epoch}, "
                f"batch {b}): stopped before that update, so the weights are those after step "
                f"{self.step}. Lower lr (now {self.config.lr:g}), keep max_grad_norm set, use "
                f"precision='fp32' (now {self.config.precision!r}), or look for bad inputs in that batch")
        if acc is not None:
            acc.backward(loss)
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        return value

    def optimizer_step(self, loss: float) -> dict[str, float]:
        """Schedule, clip, step; returns the history row of this step."""
        config, optimizer, scaler = self.config, self.optimizer, self.scaler
        factor = lr_factor(self.step, self.total, self.warm, config.schedule)
        for g, scale in zip(optimizer.param_groups, self.lr_scales):
            g["lr"] = config.lr * factor * scale  # scale: 1, or loraplus_ratio for LoRA's B matrices
        if scaler is not None:
            scaler.unscale_(optimizer)
        clip = config.max_grad_norm or float("inf")
        norm = (self.accelerator.clip_grad_norm_(self.params, clip) if self.accelerator is not None
                else torch.nn.utils.clip_grad_norm_(self.params, clip))
        # fp16's loss scaling overflows now and then by design (the scaler skips that step);
        # anywhere else a nan/inf gradient would write nan into the weights
        if config.precision != "fp16" and not math.isfinite(float(norm)):
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"the gradient norm is {float(norm)} at step {self.step + 1} (epoch {self.epoch}) although the "
                f"loss was finite ({loss:.4g}): stopped before that update, so the weights are "
                f"those after step {self.step}. Lower lr (now {config.lr:g}) or look for an operation "
                "that overflows in the backward pass (e.g. a log or a division near 0)")
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": config.lr * factor,
                "grad_norm": float(norm)}

    def log(self, row: dict[str, float]) -> None:
        self.result.history.append(row)
        self.bar.update(1)
        if self.step % self.config.log_every == 0:
            if self.writer is not None:
                for k in ("loss", "lr", "grad_norm"):
                    self.writer.add_scalar(f"train/{k}", row[k], self.step)
            self._show("loss", f"loss {row['loss']:.4f}")

    def _show(self, key: str, text: str) -> None:
        self.shown[key] = text
        self.bar.set_postfix_str(" | ".join(self.shown.values()), refresh=False)

    # -- evaluation and checkpoints ---------------------------------------------------------
    def evaluate(self) -> None:
        """Score eval_data (the global random state is left as it was), track the best step."""
        if self.eval_data is None:
            return
        with rng_preserved():  # evaluate() preserves it too; this also covers on_evaluate
            result, metric = self.result, self.metric
            t0 = time.perf_counter()
            scores = evaluate(self.raw, self.eval_data, autocast_dtype=self.amp_dtype)
            result.eval_seconds += time.perf_counter() - t0
            result.evals.append({"step": self.step, "epoch": self.epoch, **scores})
            if metric not in scores:
                raise KeyError(f"TrainConfig.metric={metric!r} is not among the eval scores {sorted(scores)}: "
                               "use one of those")
            value = scores[metric]
            better = (result.best_metric is None or
                      (value < result.best_metric if metric in _LOWER_IS_BETTER else value > result.best_metric))
            if better:
                result.best_metric, result.best_step = value, self.step
            if self.writer is not None:
                for k, v in scores.items():
                    self.writer.add_scalar(f"eval/{k}", v, self.step)
            self._show("eval", f"eval {metric} {value:.4f}")
            if self.on_evaluate is not None:
                self.on_evaluate(result.evals[-1])

    def save(self, next_epoch: int, next_batch: int) -> None:
        """A checkpoint from which ``resume_from`` continues at (next_epoch, next_batch)."""
        result, config = self.result, self.config
        if self.main:
            state = {"epoch": next_epoch, "batch_in_epoch": next_batch, "history": result.history,
                     "evals": result.evals, "best_metric": result.best_metric,
                     "best_step": result.best_step, "config": dataclasses.asdict(config),
                     "scaler": self.scaler.state_dict() if self.scaler is not None else None}
            path = ckpt.save_checkpoint(Path(config.output_dir) / "checkpoints", self.step, self.raw,
                                        self._inner_optimizer(), self.names, state, keep=config.keep_checkpoints)
            result.checkpoints.append(str(path))
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    # -- the loop ---------------------------------------------------------------------------
    def loop(self) -> TrainResult:
        config = self.config
        if config.log_tensorboard and self.main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(config.output_dir) / "tensorboard"))
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, initial=self.step, desc="train", unit="step",
                        disable=not (config.progress and self.main), dynamic_ncols=True)
        self.model.train()
        memory = PeakMemory(self.device)
        with memory, contextlib.closing(self.bar):  # the bar closes on an error too
            while self.step < self.total:
                if self.epoch_pass():
                    self.epoch += 1
        if self.eval_data is not None and (not self.result.evals or self.result.evals[-1]["step"] != self.step):
            self.evaluate()
        if self.writer is not None:
            self.writer.close()
        self.model.eval()
        result, times = self.result, self.step_times
        done = times[1:] or times  # the first step pays for lazy initialisation
        result.steps = self.step
        result.train_seconds = float(sum(times))
        result.step_seconds = float(sorted(done)[len(done) // 2]) if done else float("nan")
        result.peak_memory_bytes, result.extra_memory_bytes = memory.peak, memory.extra
        return result

    def epoch_pass(self) -> bool:
        """One pass over the training data (from ``skip`` on a resumed epoch); True if it finished."""
        config, loader = self.config, self.loader
        _seed_epoch(loader, config.seed, self.epoch)
        n_batches = len(loader)
        t_step, loss_sum = time.perf_counter(), 0.0
        for b, batch in enumerate(loader):
            if b < self.skip:
                continue
            start = (b // config.grad_accum) * config.grad_accum
            window = min(config.grad_accum, n_batches - start)
            last = b + 1 - start == window
            loss_sum += self.forward_backward(batch, window, last, b)
            if not last:
                continue
            row = self.optimizer_step(loss_sum)
            self.step_times.append(time.perf_counter() - t_step)
            self.log(row)
            loss_sum = 0.0
            end_of_epoch = b + 1 == n_batches
            if (config.eval_every and self.step % config.eval_every == 0) or (end_of_epoch and not config.eval_every):
                self.evaluate()
            if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                self.save(self.epoch + 1 if end_of_epoch else self.epoch, 0 if end_of_epoch else b + 1)
            t_step = time.perf_counter()
            if self.step >= self.total:
                self.skip = 0
                return end_of_epoch
        self.skip = 0
        return True
