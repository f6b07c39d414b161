"""Hyper-parameter search with Optuna (Akiba et al., 2019) for any peftlab method.

``tune(make_model, train_data, eval_data, method="lora", n_trials=8)`` samples the method's
hyper-parameters (LoRA: rank r, alpha and the learning rate; prefix/prompt tuning: the prefix
length and the learning rate; adapters: the bottleneck width and the learning rate) with a
seeded TPE sampler, trains each trial with ``peftlab.train``, reports every intermediate
validation score to Optuna and lets a ``MedianPruner`` stop trials that fall behind the median
of earlier ones at the same step. Returns the ``optuna.Study`` (``study.best_params``,
``study.trials_dataframe()``, ``optuna.visualization.matplotlib``).

Explained (and the study plotted) in ``notebooks/07_training.ipynb``, section "Searching".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import optuna
from torch import nn

from peftlab.methods import METHODS, TRAIN_OPTIONS, MethodHParams, prepare
from peftlab.train import TrainConfig, train

__all__ = ["tune", "suggest", "trial_params"]


def suggest(trial: optuna.Trial, method: str) -> dict:
    """The search space of ``method``: a dict of ``MethodHParams`` fields and ``lr``."""
    if method in ("lora", "peft-lora"):
        r = trial.suggest_categorical("r", [2, 4, 8, 16])
        return {"r": r, "alpha": trial.suggest_categorical("alpha", [8, 16, 32]),
                "lr": trial.suggest_float("lr", 1e-4, 5e-3, log=True)}
    if method in ("prefix", "prompt"):  # flat prefixes peak near 5e-2 on MiniLM (peftlab.methods.LEARNING_RATES)
        low, high = (3e-3, 1e-1) if method == "prefix" else (1e-4, 3e-2)
        return {"prefix_length": trial.suggest_categorical("prefix_length", [4, 8, 16, 32]),
                "lr": trial.suggest_float("lr", low, high, log=True)}
    if method in ("houlsby", "pfeiffer"):
        return {"bottleneck": trial.suggest_categorical("bottleneck", [8, 16, 32, 64]),
                "lr": trial.suggest_float("lr", 1e-4, 5e-3, log=True)}
    if method in ("head", "full"):
        high = 5e-3 if method == "head" else 2e-4
        return {"lr": trial.suggest_float("lr", high / 100, high, log=True)}
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def trial_params(params: dict, base: MethodHParams | None = None) -> tuple[MethodHParams, float | None]:
    """Split sampled params into ``MethodHParams`` and the learning rate."""
    params = dict(params)
    lr = params.pop("lr", None)
    return dataclasses.replace(base or MethodHParams(), **params), lr


def tune(make_model: Callable[[], nn.Module], train_data, eval_data, *, method: str = "lora",
         n_trials: int = 8, config: TrainConfig | None = None, seed: int = 0,
         space: Callable[[optuna.Trial, str], dict] | None = None,
         pruner: optuna.pruners.BasePruner | None = None, study_name: str | None = None,
         storage: str | None = None, base: MethodHParams | None = None) -> optuna.Study:
    """Search ``method``'s hyper-parameters; return the Optuna study (maximising ``config.metric``).

    ``make_model()`` must return a *fresh* base model each call (e.g.
    ``lambda: peftlab.load_model("minilm", task="classification", seed=0)[0]``).
    ``config``: the training budget of every trial; set ``eval_every`` to get intermediate
    reports for pruning (default: evaluate every quarter of the steps).
    """
    if not isinstance(n_trials, int) or n_trials <= 0:
        raise ValueError(f"n_trials must be a positive int, got {n_trials!r}")
    if eval_data is None:
        raise ValueError("tune needs eval_data: trials are compared on the validation metric")
    config = config or TrainConfig(max_steps=40, progress=False)
    if config.eval_every is None:
        budget = config.max_steps
        if budget is not None:
            config = dataclasses.replace(config, eval_every=max(1, budget // 4))
    lower = config.metric in ("loss", "perplexity")
    study = optuna.create_study(
        direction="minimize" if lower else "maximize", study_name=study_name, storage=storage,
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, n_trials)),
        pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
        load_if_exists=storage is not None)
    space = space or suggest

    def objective(trial: optuna.Trial) -> float:
        hp, lr = trial_params(space(trial, method), base)
        model = prepare(make_model(), method, hp)
        # the method's own TrainConfig options (LoRA+'s ratio, prefix-tuning's head rate) unless config sets them
        options = {k: v for k, v in TRAIN_OPTIONS.get(method, {}).items() if getattr(config, k) is None}
        trial_cfg = dataclasses.replace(config, lr=lr or config.lr, seed=seed, **options)

        def report(scores: dict) -> None:
            name = config.metric if config.metric in scores else "loss"
            trial.report(scores[name], step=int(scores["step"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {scores['step']}: {name}={scores[name]:.4f}")

        result = train(model, train_data, eval_data, trial_cfg, on_evaluate=report)
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("train_seconds", result.train_seconds)
        return float(result.final[result.metric])

    study.optimize(objective, n_trials=n_trials, gc_after_trial=True)
    return study
