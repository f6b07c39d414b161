"""peftlab.methods, peftlab.search (Optuna) and the `peftlab` command line."""

from __future__ import annotations

import json

import optuna
import pytest

from peftlab import cli
from peftlab.bench.table import BenchSettings, format_markdown, run_bench
from peftlab.methods import METHODS, MethodHParams, MethodUnavailable, prepare, save_trained
from peftlab.search import suggest, tune
from peftlab.train import TrainConfig
from train_helpers import tiny_bert, toy_classification


@pytest.mark.parametrize("method", METHODS)
def test_every_method_prepares_a_trainable_classifier(method, tmp_path):
    from peftlab.methods import available

    if available(method) is not None:
        pytest.skip(available(method))
    model = prepare(tiny_bert(), method, MethodHParams(r=2, prefix_length=3, bottleneck=4))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and any("classifier" in n for n in names)
    total = sum(p.numel() for p in tiny_bert().parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (trainable == total) == (method == "full")
    assert save_trained(model, method, tmp_path / method) > 0


def test_the_family_methods_are_what_they_say():
    from peftlab.ia3 import IA3Linear
    from peftlab.lora import LoRALinear
    from peftlab.methods import LEARNING_RATES, TRAIN_OPTIONS
    from peftlab.quant import Linear4bit
    from peftlab.train import param_groups

    hp = MethodHParams(r=2)
    qlora = prepare(tiny_bert(), "qlora", hp)
    wrapped = [m for m in qlora.modules() if isinstance(m, LoRALinear)]
    assert wrapped and all(isinstance(m.base_layer, Linear4bit) for m in wrapped)
    assert not isinstance(qlora.classifier, Linear4bit)  # the trained head stays full precision
    assert not any(p.requires_grad for n, p in qlora.named_parameters() if "lora_" not in n and "classifier" not in n)
    dora = prepare(tiny_bert(), "dora", hp)
    assert any("lora_magnitude_vector" in n for n, _ in dora.named_parameters())
    assert any(isinstance(m, IA3Linear) for m in prepare(tiny_bert(), "ia3").modules())
    ratio = TRAIN_OPTIONS["lora-plus"]["loraplus_ratio"]
    groups, names = param_groups(prepare(tiny_bert(), "lora-plus", hp), 0.01, loraplus_ratio=ratio)
    scaled = [n for g, ns in zip(groups, names) if g.get("lr_scale") == ratio for n in ns]
    assert scaled and all("lora_B" in n for n in scaled)
    assert set(LEARNING_RATES) == set(METHODS)
    cfg = TrainConfig(lr=LEARNING_RATES["lora-plus"], **TRAIN_OPTIONS["lora-plus"])
    assert cfg.loraplus_ratio == ratio


def test_missing_methods_say_so(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peftlab.adapters", None)  # as if not installed
    with pytest.raises(MethodUnavailable, match="'houlsby' needs peftlab.adapters"):
        prepare(tiny_bert(), "houlsby")
    with pytest.raises(ValueError, match="unknown method 'lorra'"):
        prepare(tiny_bert(), "lorra")


def test_tune_runs_a_seeded_pruned_study():
    data, val = toy_classification(16), toy_classification(8, seed=1)
    cfg = TrainConfig(batch_size=4, max_steps=4, eval_every=2, progress=False)

    def run():
        return tune(tiny_bert, data, val, method="lora", n_trials=3, config=cfg, seed=0)

    study = run()
    assert len(study.trials) == 3 and study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert set(study.best_params) == {"r", "alpha", "lr"}
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert finished and all(sorted(t.intermediate_values) == [2, 4] for t in finished)
    assert [t.params for t in run().trials] == [t.params for t in study.trials]  # seeded sampler
    with pytest.raises(ValueError, match="eval_data"):
        tune(tiny_bert, data, None)


def test_pruner_stops_a_trial_behind_the_median():
    data, val = toy_classification(16), toy_classification(8, seed=1)
    cfg = TrainConfig(batch_size=4, max_steps=4, eval_every=1, progress=False, metric="loss")
    rates = [1e-2, 1e-2, 50.0]  # the third trial diverges, so its loss is far behind

    def space(trial, method):
        return {"lr": rates[trial.number]}  # a space may also fix values instead of sampling

    study = tune(tiny_bert, data, val, method="head", n_trials=3, config=cfg, space=space,
                 pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED]


def test_search_spaces_cover_prefix_and_adapters():
    trial = optuna.trial.FixedTrial({"prefix_length": 8, "lr": 1e-2, "bottleneck": 16})
    assert suggest(trial, "prefix") == {"prefix_length": 8, "lr": 1e-2}
    assert suggest(trial, "prompt") == {"prefix_length": 8, "lr": 1e-2}
    assert suggest(trial, "houlsby") == {"bottleneck": 16, "lr": 1e-2}


# --- command line -------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["train", "--method", "lorra", "--output-dir", "x"], "invalid choice: 'lorra'"),
    (["train", "--method", "lora", "--output-dir", "x", "--lr", "0"], "must be > 0"),
    (["train", "--method", "lora", "--output-dir", "x", "--batch-size", "0"], "positive integer"),
    (["train", "--method", "prefix", "--output-dir", "x", "--head-lr", "0"], "must be > 0"),
    (["train", "--method", "lora-plus", "--output-dir", "x", "--loraplus-ratio", "-4"], "must be > 0"),
    (["train", "--method", "lora"], "--output-dir"),
    (["bench", "--methods", "lora,nope"], "unknown method"),
    (["bench", "lora", "--quick"], "apply to the table"),
    ([], "required"),
])
def test_cli_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_markdown_marks_missing_methods():
    data = {"command": "peftlab bench --quick", "settings": {**BenchSettings.quick().__dict__},
            "seconds": 60, "machine": {"torch": "x", "cpu_threads": 2},
            "rows": [{"method": "houlsby", "label": "Houlsby adapters", "available": False, "reason": "r"}]}
    assert "| Houlsby adapters | not available yet |" in format_markdown(data)


@pytest.mark.slow
def test_cli_train_smoke(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--method", "lora", "--max-steps", "3", "--train-size", "48",
                     "--batch-size", "8", "--output-dir", str(out), "--no-progress",
                     "--checkpoint-every", "3"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 3 and 0 <= summary["test"]["accuracy"] <= 1
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "latest").is_file()


class _Stop(Exception):
    pass


@pytest.mark.parametrize("argv, head_lr, ratio", [
    (["--method", "prefix"], 1e-2, None),  # the method's own options (peftlab.methods.TRAIN_OPTIONS)
    (["--method", "prefix", "--head-lr", "3e-3"], 3e-3, None),  # the flag wins
    (["--method", "lora-plus", "--loraplus-ratio", "8"], None, 8.0),
    (["--method", "lora"], None, None),
])
def test_cli_train_passes_the_methods_options_and_the_flags(argv, head_lr, ratio, monkeypatch, tmp_path):
    import importlib

    train_module = importlib.import_module("peftlab.train")  # (peftlab.train is also the function's name)
    seen = {}

    def fake_train(model, data, eval_data=None, config=None, **kw):
        seen["config"] = config
        raise _Stop

    monkeypatch.setattr(train_module, "train", fake_train)
    with pytest.raises(_Stop):
        cli.main(["train", *argv, "--train-size", "16", "--output-dir", str(tmp_path), "--no-progress"])
    assert seen["config"].head_lr == head_lr and seen["config"].loraplus_ratio == ratio


@pytest.mark.slow
def test_table_rows_are_mean_and_sample_std_over_seeds():
    from peftlab.bench.table import summarise

    runs = [{"method": "lora", "seed": seed, "available": True, "accuracy": acc, "f1": acc - 0.01, "roc_auc": 0.9,
             "memory_bytes": 100 + seed, "latency_ratio": 1.0, "train_seconds": 10.0, "trainable": 5, "total": 50,
             "percent": 10.0, "stored_bytes": 7, "lr": 2e-3, "steps": 3} for seed, acc in ((0, 0.80), (1, 0.70))]
    row = summarise("lora", runs)
    assert row["seeds"] == [0, 1] and row["accuracy"] == pytest.approx(0.75)
    assert row["accuracy_std"] == pytest.approx(0.1 / 2 ** 0.5)  # sample std of two values: |a - b| / sqrt(2)
    assert row["memory_bytes"] == pytest.approx(100.5) and row["trainable"] == 5


def test_bench_smoke_on_a_tiny_budget(tmp_path):
    settings = BenchSettings.quick(max_steps=2, train_size=32, test_size=32, latency_repeats=2,
                                   seeds=(0,), timing_rounds=2)
    data = run_bench(settings, ("full", "lora"), tmp_path, log=lambda *a: None)  # 2 child runs + the timing
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["full"]["step_ratio"] == 1.0 and rows["full"]["percent"] == 100.0
    lora = rows["lora"]
    assert [run["seed"] for run in lora["runs"]] == [0] and lora["accuracy"] == lora["runs"][0]["accuracy"]
    assert data["timing"]["lora"]["rounds"] == 2 and lora["step_seconds"] > 0
    assert rows["lora"]["percent"] < 1.0 and rows["lora"]["stored_bytes"] < rows["full"]["stored_bytes"]
    md = (tmp_path / "benchmark.md").read_text()
    assert "peftlab LoRA" in md and json.loads((tmp_path / "benchmark.json").read_text())["rows"]
