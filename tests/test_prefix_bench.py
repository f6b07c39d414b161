"""Issue 15's measurements: the E2E bench's summary and JSON, and the stored prefix-tuning results.

The stored files are made by ``python -m peftlab.bench e2e`` (data/results/e2e.json) and
``peftlab bench --methods prefix --seeds 0,1,2 --output data/results/prefix``;
these tests check that what they hold is consistent (means and stds recomputed from the per-seed
runs, every curve as long as its run) and what notebook 04 and the README read from them.
"""

from __future__ import annotations

import json
import statistics

import pytest

from peftlab.bench import cli as bench_cli
from peftlab.bench import e2e
from peftlab.bench.table import default_output


def _fake_run(method: str, seed: int, quick: bool) -> dict:
    if method == "base":
        return {"method": "base", "seed": seed, "bleu": 3.0, "rouge_l": 0.1, "examples": [], "tables": 4}
    bleu = {"prefix": 50.0, "prefix-random": 10.0, "prompt": 30.0, "lora": 52.0}[method] + seed
    return {"method": method, "seed": seed, "trainable": 7, "lr": 1e-3, "steps": 3, "train_peak_mb": None,
            "bleu": bleu, "rouge_l": bleu / 100, "loss_first": 3.0, "loss_last": 1.0 + seed,
            "losses": [3.0, 2.0, 1.0 + seed], "train_s": 1.0, "examples": [], "tables": 4}


def test_bench_e2e_summarises_three_seeds_and_runs_the_random_start_once(monkeypatch):
    calls = []
    monkeypatch.setattr(e2e, "_child", lambda m, s, q: calls.append((m, s)) or _fake_run(m, s, q))
    result = e2e.bench_e2e(log=lambda *_: None)
    assert calls == [("base", 0)] + [(m, s) for s in (0, 1, 2) for m in e2e.REFERENCE_METHODS
                                     if m not in e2e.ONE_SEED_ONLY or s == 2]
    prefix, random_start = result["summary"]["prefix"], result["summary"]["prefix-random"]
    assert prefix["bleu"] == [50.0, 51.0, 52.0] and prefix["seeds"] == [0, 1, 2]
    assert prefix["bleu_mean"] == pytest.approx(51.0) and prefix["bleu_std"] == pytest.approx(1.0)  # sample std
    assert prefix["losses_mean"] == pytest.approx([3.0, 2.0, 2.0])  # per step, over the seeds
    assert random_start["seeds"] == [2] and random_start["bleu_std"] == 0.0
    table = e2e.format_e2e(result)
    assert "| 50.0 / 51.0 / 52.0 | 51.0 ± 1.0 | 0.510 ± 0.010 | 2.00 |" in table
    assert "| 12.0 | 12.0 (one seed) | 0.120 | 3.00 |" in table
    assert "LoRA minus prefix-tuning (text init) at the same budget: +2.0 BLEU" in table


def test_the_e2e_command_writes_its_json_only_for_the_reference_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(e2e, "_child", _fake_run)
    monkeypatch.setattr(e2e, "default_path", lambda: tmp_path / "e2e.json")
    assert bench_cli.main(["e2e", "--seeds", "0,1"]) == 0  # not the reference: printed, not stored
    assert not (tmp_path / "e2e.json").exists()
    assert bench_cli.main(["e2e"]) == 0
    stored = json.loads((tmp_path / "e2e.json").read_text())
    assert stored["settings"]["seeds"] == [0, 1, 2] and set(stored["summary"]) == set(e2e.REFERENCE_METHODS)
    assert (tmp_path / "e2e.md").read_text().startswith("E2E NLG on SmolLM2-135M")
    assert "| prompt tuning, 10 virtual tokens, text init |" in capsys.readouterr().out


def test_the_stored_e2e_reference_is_consistent_with_its_runs():
    ref = e2e.reference()
    for method, row in ref["summary"].items():
        runs = ref["runs"][method]
        assert row["bleu"] == [r["bleu"] for r in runs]
        assert row["bleu_mean"] == pytest.approx(statistics.fmean(row["bleu"]))
        if len(runs) > 1 and "bleu_std" in row:
            assert row["bleu_std"] == pytest.approx(statistics.stdev(row["bleu"]))
        for r in runs:
            if "losses" in r:
                assert len(r["losses"]) == r["steps"] and r["losses"][-1] == pytest.approx(r["loss_last"], abs=1e-4)


def test_the_stored_prefix_study_on_rotten_tomatoes():
    path = default_output() / "prefix" / "benchmark.json"
    data = json.loads(path.read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert data["settings"]["seeds"] == [0, 1, 2] and data["settings"]["epochs"] == 1
    assert not data["settings"]["max_steps"] and not data["settings"]["train_size"]  # one full epoch, all data
    for method in ("prefix",):
        accs = [r["accuracy"] for r in rows[method]["runs"]]
        assert len(accs) == 3
        assert rows[method]["accuracy"] == pytest.approx(statistics.fmean(accs))
        assert rows[method]["accuracy_std"] == pytest.approx(statistics.stdev(accs))
    assert rows["prefix"]["trainable"] == 16 * 6 * 2 * 384 + 384 * 2 + 2  # flat 2 L m d_kv + the head


def test_reuse_takes_over_only_runs_of_the_same_budget_method_and_rate(monkeypatch):
    calls = []
    monkeypatch.setattr(e2e, "_child", lambda m, s, q: calls.append((m, s)) or _fake_run(m, s, q))
    earlier = e2e.bench_e2e(seeds=(0, 1), methods=("prefix", "lora"), log=lambda *_: None)
    earlier["runs"]["prefix"][0] = {**earlier["runs"]["prefix"][0], "bleu": 99.0, "train_s": 500.0}
    calls.clear()
    again = e2e.bench_e2e(methods=("prefix", "lora"), reuse=earlier, log=lambda *_: None)
    assert calls == [("prefix", 2), ("lora", 2)]  # the base model and seeds 0, 1 were taken over
    assert again["summary"]["prefix"]["bleu"] == [99.0, 51.0, 52.0]  # the earlier run's numbers, as stored
    assert again["runs"]["prefix"][0]["reused"] and not again["runs"]["prefix"][2].get("reused")
    assert again["summary"]["prefix"]["train_s_median"] == 1.0  # one slow run (500 s) does not move the median
    other = {**earlier, "settings": {**earlier["settings"], "steps": 50}}  # another budget: nothing fits
    calls.clear()
    e2e.bench_e2e(methods=("prefix",), seeds=(0,), reuse=other, log=lambda *_: None)
    assert calls == [("base", 0), ("prefix", 0)]
    moved = {**earlier, "summary": {**earlier["summary"], "lora": {**earlier["summary"]["lora"], "lr": 1e-4}}}
    calls.clear()
    e2e.bench_e2e(methods=("lora",), seeds=(0,), reuse=moved, log=lambda *_: None)  # another rate: trained again
    assert calls == [("lora", 0)]
