"""peftlab.train and peftlab.checkpoint on tiny random models (fast)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from peftlab import checkpoint as ckpt
from peftlab.train import TrainConfig, lr_factor, param_groups, train, warmup_steps
from train_helpers import freeze_all_but, tiny_bert, toy_classification, trainable


def quiet(**kw) -> TrainConfig:
    kw.setdefault("progress", False)
    return TrainConfig(**kw)


# --- the schedule, by hand ----------------------------------------------------------------

def test_lr_factor_matches_hand_values():
    # 10 steps, 2 warm-up: 1/2, 2/2, then p = 0/8 ... 7/8
    assert [lr_factor(s, 10, 2, "linear") for s in range(4)] == [0.5, 1.0, 1.0, 1 - 1 / 8]
    assert lr_factor(9, 10, 2, "linear") == pytest.approx(1 / 8)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)  # p = 4/8: cos(pi/2) = 0
    assert lr_factor(4, 10, 2, "cosine") == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert lr_factor(9, 10, 0, "constant") == 1.0
    assert warmup_steps(0.1, 50) == 5 and warmup_steps(7, 50) == 7
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 10, 0, "step")


def test_history_follows_the_schedule():
    model = tiny_bert()
    res = train(model, toy_classification(16), None, quiet(lr=0.01, batch_size=4, max_steps=6,
                                                            warmup=2, schedule="cosine"))
    assert [r["lr"] for r in res.history] == pytest.approx(
        [0.01 * lr_factor(s, 6, 2, "cosine") for s in range(6)])
    assert res.steps == 6 and len(res.history) == 6


# --- configuration errors ---------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"lr": 0}, "TrainConfig.lr must be a positive number, got 0"),
    ({"lr": -1e-3}, "lr"),
    ({"batch_size": 0}, "TrainConfig.batch_size must be a positive int, got 0"),
    ({"grad_accum": 0}, "grad_accum"),
    ({"warmup": 1.5}, "warmup"),
    ({"schedule": "step"}, "schedule"),
    ({"precision": "fp8"}, "precision"),
    ({"checkpoint_every": 5}, "output_dir"),
    ({"max_grad_norm": 0}, "max_grad_norm"),
])
def test_config_errors_name_value_and_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        train(tiny_bert(), toy_classification(8), None, quiet(precision="fp16", max_steps=1))


def test_bad_data_errors():
    model = tiny_bert()
    with pytest.raises(ValueError, match="empty"):
        train(model, toy_classification(8).select([]), None, quiet())
    raw = toy_classification(8).rename_column("labels", "label").remove_columns("input_ids")
    raw = raw.add_column("text", ["a"] * 8)
    with pytest.raises(KeyError, match="tokenize_classification"):
        train(model, raw, None, quiet())
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(freeze_all_but(tiny_bert(), "nothing"), toy_classification(8), None, quiet())


def test_weight_decay_groups_skip_biases_and_norms():
    model = tiny_bert()
    groups, names = param_groups(model, 0.1)
    decayed, plain = names
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all(not n.endswith("bias") and "LayerNorm" not in n for n in decayed)
    assert any("LayerNorm.weight" in n for n in plain) and any(n.endswith("bias") for n in plain)
    assert "bert.encoder.layer.0.attention.self.query.weight" in decayed
    assert len(decayed) + len(plain) == sum(1 for p in model.parameters() if p.requires_grad)


# --- accumulation, evaluation, logging -------------------------------------------------------

def test_accumulation_equals_big_batch():
    data = toy_classification(16)
    # plain shuffling: one batch of 8 then holds exactly the rows of two batches of 4
    # (length grouping forms its groups from the batch size, so the rows would differ)
    cfg = dict(lr=1e-3, max_steps=2, warmup=0, weight_decay=0.0, max_grad_norm=None, group_by_length=False)
    big, small = tiny_bert(), tiny_bert()
    r_big = train(big, data, None, quiet(batch_size=8, grad_accum=1, **cfg))
    r_small = train(small, data, None, quiet(batch_size=4, grad_accum=2, **cfg))
    for a, b in zip(r_big.history, r_small.history):  # loss and pre-clip gradient norm
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for (n, p), q in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_evaluates_each_epoch_and_logs_tensorboard(tmp_path):
    model = tiny_bert()
    res = train(model, toy_classification(12), toy_classification(8, seed=1),
                quiet(lr=1e-3, batch_size=4, epochs=2, output_dir=str(tmp_path), log_tensorboard=True,
                      log_every=1))
    assert [e["step"] for e in res.evals] == [3, 6]
    assert {"loss", "accuracy", "f1", "roc_auc"} <= set(res.final)
    assert res.best_step in (3, 6) and res.metric == "accuracy"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert res.peak_memory_bytes > 0 and res.step_seconds > 0
    assert not model.training  # handed back in eval mode


def test_bf16_autocast_on_cpu_trains():
    res = train(tiny_bert(), toy_classification(8), None, quiet(precision="bf16", max_steps=2, batch_size=4))
    assert all(math.isfinite(r["loss"]) for r in res.history)


# --- checkpoints and resuming -----------------------------------------------------------------

def _resume_config(out, **kw):
    return quiet(lr=5e-3, batch_size=4, max_steps=8, warmup=2, checkpoint_every=4,
                 output_dir=str(out), **kw)


class Stop(Exception):
    pass


def test_resume_reaches_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    data = toy_classification(10)  # 3 batches an epoch: step 4 is mid-epoch
    straight = tiny_bert(dropout=0.1)  # dropout: the RNG state must be restored too
    train(straight, data, None, _resume_config(tmp_path / "a"))

    real_save = ckpt.save_checkpoint

    def save_then_crash(*args, **kwargs):
        path = real_save(*args, **kwargs)
        raise Stop  # the process "dies" right after its first checkpoint

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_crash)
    with pytest.raises(Stop):
        train(tiny_bert(dropout=0.1), data, None, _resume_config(tmp_path / "b"))
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    torch.manual_seed(1234)  # a fresh process would have another RNG state
    resumed = tiny_bert(seed=5, dropout=0.1)  # other initial weights: all must come from the checkpoint
    res = train(resumed, data, None, _resume_config(tmp_path / "b"), resume_from=tmp_path / "b")
    assert res.resumed_from.endswith("step-000004") and res.steps == 8
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    assert len(res.history) == 8


def test_crash_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = ckpt.save_file

    def flaky(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # second checkpoint, second file (optimizer)
            real({"half": torch.zeros(1)}, path)  # a partial file...
            raise OSError("disk full")  # ...then the crash
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_bert(), toy_classification(10), None, _resume_config(tmp_path))
    folder = tmp_path / "checkpoints"
    assert (folder / "latest").read_text().strip() == "step-000004"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-000004"]
    monkeypatch.setattr(ckpt, "save_file", real)
    res = train(tiny_bert(), toy_classification(10), None, _resume_config(tmp_path), resume_from=tmp_path)
    assert res.steps == 8


def test_checkpoint_is_pickle_free_and_complete(tmp_path):
    model = freeze_all_but(tiny_bert(), "classifier", "query")
    train(model, toy_classification(8), None,
          quiet(batch_size=4, max_steps=4, checkpoint_every=4, output_dir=str(tmp_path)))
    folder = ckpt.resolve_checkpoint(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == sorted(ckpt.FILES)
    state = json.loads((folder / "state.json").read_text())
    assert set(state["shapes"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    for f in folder.iterdir():  # nothing pickled anywhere
        assert b"\x80\x04\x95" not in f.read_bytes()[:64]


def test_checkpoint_of_another_model_is_refused_clearly(tmp_path):
    data = toy_classification(8)
    cfg = quiet(batch_size=4, max_steps=4, checkpoint_every=4, output_dir=str(tmp_path))
    train(freeze_all_but(tiny_bert(), "classifier", "query"), data, None, cfg)
    other = freeze_all_but(tiny_bert(), "classifier", "value")
    before = trainable(other)
    with pytest.raises(ckpt.CheckpointMismatch, match="another model.*only in the checkpoint.*query"):
        train(other, data, None, cfg, resume_from=tmp_path)
    assert all(torch.equal(before[n], p) for n, p in trainable(other).items())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(other, data, None, cfg, resume_from=tmp_path / "nowhere")


def test_evaluation_does_not_change_the_training_run():
    """Evaluating between steps must leave dropout masks (torch's global RNG) alone."""
    data = toy_classification(24)
    cfg = dict(lr=1e-2, max_steps=6, eval_every=2, batch_size=4, seed=3)
    with_eval, without = tiny_bert(dropout=0.2), tiny_bert(dropout=0.2)
    train(with_eval, data, toy_classification(8, seed=1), quiet(**cfg))
    train(without, data, None, quiet(**cfg))
    for (name, a), b in zip(trainable(with_eval).items(), trainable(without).values()):
        assert torch.equal(a, b), name


def test_training_batches_are_grouped_by_length():
    from peftlab.metrics import as_loader

    data = toy_classification(48)
    loader = as_loader(data, 8, shuffle=True, seed=0)
    lengths = [len(x) for x in data["input_ids"]]
    seen = sorted(i for b in loader.batch_sampler for i in b)
    assert seen == list(range(48))
    for batch in loader:  # a batch is padded to its longest row only
        assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())
    assert loader.batch_sampler.lengths.tolist() == lengths
