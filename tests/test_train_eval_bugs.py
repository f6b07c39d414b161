"""Regression tests for three evaluation/training bugs, on tiny random models.

1. ``metrics.evaluate`` on a prompt-tuned causal LM scored the logits of the m virtual-token
   positions instead of the real next-token predictions (and ``train`` picked its best step
   from that number).
2. Evaluation drew from the global random state, so the same seeded run ended with other
   weights when it evaluated in between (other dropout masks, another data order).
3. Training accepted non-finite numbers, misspelled metrics and bad labels silently, or failed
   deep inside torch after some steps had already changed the weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from peftlab import PromptTuningConfig, inject
from peftlab import metrics as M
from peftlab.data import PadCollator
from peftlab.train import TrainConfig, train
from train_helpers import VOCAB, tiny_bert, tiny_llama, toy_classification, trainable

M_VIRTUAL = 3  # prompt length of the prompt-tuned models below


def quiet(**kw) -> TrainConfig:
    kw.setdefault("progress", False)
    return TrainConfig(**kw)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def plain_loader(data, batch_size: int = 4, shuffle: bool = False) -> DataLoader:
    """A DataLoader as a user would write it: no generator of its own."""
    collate = PadCollator(M._Pad(0))
    return DataLoader(data.with_format("python") if hasattr(data, "with_format") else data,
                      batch_size=batch_size, shuffle=shuffle, collate_fn=collate)


def toy_lm(n: int = 6, seed: int = 0) -> Dataset:
    """Rows of varying length; the first token of each row is a prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(n):
        length = int(torch.randint(4, 9, (1,), generator=g))
        ids = [1] + torch.randint(3, VOCAB, (length,), generator=g).tolist()
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append([-100] + ids[1:])
    return Dataset.from_dict(rows)


def prompt_tuned_llama() -> torch.nn.Module:
    model = inject(tiny_llama(), PromptTuningConfig(num_virtual_tokens=M_VIRTUAL, init="random"), "p")
    with torch.no_grad():  # a prompt that clearly changes the predictions
        model.prompt_tuning["p"].prompt_embedding.mul_(3.0)
    return model


# --- 1. prompt tuning: score the real positions, not the virtual ones ---------------------

def _manual_lm_scores(model, data: Dataset) -> tuple[float, float]:
    """Mean NLL and next-token accuracy over labelled real positions, one row at a time."""
    nll, hits, n = 0.0, 0, 0
    with torch.no_grad():
        for ids, labels in zip(data["input_ids"], data["labels"]):
            logits = model(input_ids=torch.tensor([ids])).logits[0]  # (m + T, V)
            assert logits.shape[0] == M_VIRTUAL + len(ids)  # the prompt's positions come first
            logp = logits[M_VIRTUAL:].log_softmax(-1)  # (T, V): the real tokens only
            for t in range(len(ids) - 1):
                if labels[t + 1] != -100:
                    nll -= float(logp[t, labels[t + 1]])
                    hits += int(logp[t].argmax()) == labels[t + 1]
                    n += 1
    return nll / n, hits / n


@pytest.mark.parametrize("batch_size", [1, 4])
def test_prompt_tuned_lm_is_scored_on_its_real_positions(batch_size):
    model, data = prompt_tuned_llama(), toy_lm()
    loss, acc = _manual_lm_scores(model, data)
    got = M.evaluate(model, data, batch_size=batch_size)
    assert got["loss"] == pytest.approx(loss, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert got["token_accuracy"] == pytest.approx(acc)


def test_prompt_tuned_lm_eval_loss_equals_the_models_own_loss():
    """One batch with every row: HF's loss (labels padded by the prompt hook) is the same mean."""
    model, data = prompt_tuned_llama(), toy_lm()
    batch = PadCollator(M._Pad(0))(list(data.with_format("python")))
    with torch.no_grad():
        want = float(model(**batch).loss)  # the hook prepends m ignored labels itself
    assert M.evaluate(model, data, batch_size=len(data))["loss"] == pytest.approx(want, rel=1e-5)


def test_train_picks_its_best_step_from_the_real_positions():
    model, data = prompt_tuned_llama(), toy_lm(8)
    res = train(model, data, data, quiet(lr=1e-2, batch_size=4, max_steps=2, eval_every=1, metric="loss"))
    loss, _ = _manual_lm_scores(model, data)
    assert res.final["loss"] == pytest.approx(loss, rel=1e-5)  # the last eval: the final weights
    assert res.best_metric == min(e["loss"] for e in res.evals)


def test_default_metric_on_an_lm_set_still_means_loss():
    model, data = tiny_llama(), toy_lm(4)
    res = train(model, data, data, quiet(batch_size=4, max_steps=1))
    assert res.metric == "loss" and res.best_metric == res.final["loss"]


# --- 2. evaluation leaves the training run alone ------------------------------------------

def test_evaluate_leaves_every_global_random_state_alone():
    import random

    import numpy as np

    model, loader = tiny_bert(dropout=0.3), plain_loader(toy_classification(8), shuffle=True)
    torch.manual_seed(11)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    M.evaluate(model, loader)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and (np.random.get_state()[1] == before[2]).all()


def test_rng_preserved_puts_back_what_the_block_drew():
    torch.manual_seed(4)
    want = torch.rand(3)
    torch.manual_seed(4)
    with M.rng_preserved():
        torch.rand(100)
    assert torch.equal(torch.rand(3), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rng_preserved_puts_back_the_cuda_generator():
    torch.manual_seed(4)
    want = torch.rand(3, device="cuda")
    torch.manual_seed(4)
    with M.rng_preserved():
        torch.nn.functional.dropout(torch.ones(100, device="cuda"), 0.5)  # draws on the GPU
    assert torch.equal(torch.rand(3, device="cuda"), want)


@pytest.mark.parametrize("loaders", ["datasets", "plain DataLoaders"])
def test_a_run_with_evaluation_ends_with_the_weights_of_one_without(loaders):
    data, held_out = toy_classification(24), toy_classification(8, seed=1)
    if loaders != "datasets":  # no generators: they draw their seeds from torch's global RNG
        data, held_out = plain_loader(data, shuffle=True), plain_loader(held_out)
    cfg = dict(lr=1e-2, max_steps=8, eval_every=2, batch_size=4, seed=3)  # 8 steps > one epoch
    with_eval, without = tiny_bert(dropout=0.2), tiny_bert(dropout=0.2)
    res = train(with_eval, data, held_out, quiet(**cfg))
    train(without, data, None, quiet(**cfg))
    assert [e["step"] for e in res.evals] == [2, 4, 6, 8]
    for (name, a), b in zip(trainable(with_eval).items(), trainable(without).values()):
        assert torch.equal(a, b), name


# --- 3. bad numbers, names and labels fail up front and change nothing ---------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"lr": float("nan")}, r"TrainConfig.lr must be a positive number, got nan"),
    ({"lr": float("inf")}, r"TrainConfig.lr .* got inf"),
    ({"weight_decay": float("nan")},
     r"TrainConfig.weight_decay must be a finite number >= 0, got nan: use 0.01"),
    ({"weight_decay": float("inf")}, r"weight_decay .* got inf"),
    ({"max_grad_norm": float("nan")}, r"max_grad_norm .* got nan: use 1.0, or None"),
    ({"max_grad_norm": float("inf")}, r"max_grad_norm .* got inf: use 1.0, or None"),
    ({"warmup": float("nan")}, r"warmup .* got nan"),
    ({"metric": "acuracy"}, r"TrainConfig.metric must be one of \('accuracy', 'f1', 'roc_auc', 'loss', "
                            r"'perplexity', 'token_accuracy'\), got 'acuracy'"),
])
def test_non_finite_numbers_and_unknown_metrics_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_a_metric_the_eval_set_does_not_measure_is_refused_before_training():
    model = tiny_bert()
    before = state(model)
    with pytest.raises(ValueError, match=r"metric='perplexity' is not measured on eval_data with one label "
                                         r"per example: use one of \('accuracy'"):
        train(model, toy_classification(8), toy_classification(4), quiet(metric="perplexity", max_steps=2))
    assert_same_state(model, before)
    lm = tiny_llama()
    with pytest.raises(ValueError, match=r"metric='f1' .* token labels .*'perplexity'"):
        train(lm, toy_lm(4), toy_lm(4), quiet(metric="f1", max_steps=1))


def _with_label(data: Dataset, row: int, value) -> list[dict]:
    rows = [dict(r) for r in data]
    rows[row]["labels"] = value
    return rows


@pytest.mark.parametrize("bad, match", [
    (2, r"train_data label 2 \(row 14\) is out of range for this model \(num_labels=2\): it must be in "
        r"\[0, 2\); remap the labels to 0..1, or build the model with num_labels=3"),
    (-1, r"label -1 \(row 14\) is out of range"),
    ("positive", r"train_data label 'positive' \(row 14\) is not a number: .*class_encode_column"),
    (0.5, r"train_data label 0.5 \(row 14\) is not an integer"),
    (float("nan"), r"label nan \(row 14\) is not an integer"),
    (None, r"label None \(row 14\) is not a number"),
])
def test_a_bad_label_late_in_the_data_fails_before_the_first_step(bad, match):
    # 16 rows in batches of 4: wherever the shuffle puts row 14, the check must come first
    model = tiny_bert()
    before = state(model)
    rows = _with_label(toy_classification(16), 14, bad)
    with pytest.raises(ValueError, match=match):
        train(model, rows, None, quiet(lr=1e-2, batch_size=4, max_steps=4, group_by_length=False))
    assert_same_state(model, before)


def test_bad_labels_in_a_dataloader_fail_before_the_first_step():
    model = tiny_bert()
    before = state(model)
    loader = plain_loader(_with_label(toy_classification(16), 13, 5))  # the 4th of 4 batches
    with pytest.raises(ValueError, match=r"train_data label 5 \(batch 3\) is out of range .*num_labels=6"):
        train(model, loader, None, quiet(lr=1e-2, max_steps=4))
    assert_same_state(model, before)
    floats = [{**r, "labels": torch.tensor(float(r["labels"]))} for r in toy_classification(8)]
    loader = DataLoader(floats, batch_size=4, collate_fn=lambda rows: {
        "input_ids": torch.tensor([r["input_ids"][:4] for r in rows]),
        "labels": torch.stack([r["labels"] for r in rows])})
    with pytest.raises(ValueError, match=r"batch 0 has labels of dtype torch.float32: .*torch.long"):
        train(model, loader, None, quiet(max_steps=1))
    assert_same_state(model, before)


def test_checking_a_dataloader_leaves_its_order_alone():
    from peftlab.train import check_labels

    gen = torch.Generator().manual_seed(5)  # shared by the loader and its RandomSampler
    loader = DataLoader(toy_classification(16).with_format("python"), batch_size=4, shuffle=True,
                        generator=gen, collate_fn=PadCollator(M._Pad(0)))
    first = [b["labels"].tolist() for b in loader]
    gen.manual_seed(5)
    model = tiny_bert()
    rng = torch.get_rng_state()
    assert check_labels(model, loader) == "classification"
    assert torch.equal(torch.get_rng_state(), rng)
    assert [b["labels"].tolist() for b in loader] == first


@pytest.mark.parametrize("bad, match", [
    (VOCAB + 5, rf"train_data token label {VOCAB + 5} \(row 4\) is out of range for this model "
                rf"\(vocabulary of {VOCAB} tokens\): it must be -100 or in \[0, {VOCAB}\); "
                r"tokenise with this model's own"),
    (-5, r"token label -5 \(row 4\) is out of range .*use -100 \(not -5\)"),
    ("a", r"token label 'a' \(row 4\) is not a number: token labels are token ids"),
])
def test_lm_labels_must_be_token_ids_or_minus_100(bad, match):
    from peftlab.train import check_labels

    model = tiny_llama()
    before = state(model)
    rows = [dict(r) for r in toy_lm(6)]
    rows[4]["labels"] = rows[4]["labels"][:-1] + [bad]
    with pytest.raises(ValueError, match=match):
        train(model, rows, None, quiet(batch_size=2, max_steps=3, group_by_length=False))
    assert_same_state(model, before)
    assert check_labels(model, toy_lm(6)) == "token"  # -100 and every id < vocab size pass


def test_bad_eval_labels_fail_before_the_first_step():
    model = tiny_bert()
    before = state(model)
    held_out = Dataset.from_list(_with_label(toy_classification(8), 7, 9))
    with pytest.raises(ValueError, match=r"eval_data label 9 \(row 7\) is out of range"):
        train(model, toy_classification(8), held_out, quiet(max_steps=2))
    assert_same_state(model, before)


def _poison_loss_on_call(model: torch.nn.Module, call: int) -> None:
    """From the ``call``-th forward on, the model's loss is nan (as after an overflow)."""
    calls = {"n": 0}

    def hook(module, args, out):
        calls["n"] += 1
        if calls["n"] >= call:
            out.loss = out.loss * float("nan")
        return out

    model.register_forward_hook(hook)


def _two_steps(**cfg) -> torch.nn.Module:
    twin = tiny_bert()
    train(twin, toy_classification(16), None, quiet(**{**cfg, "max_steps": 2}))
    return twin


def test_a_nan_loss_stops_the_run_and_keeps_the_weights_of_the_step_before():
    cfg = dict(lr=1e-2, batch_size=4, max_steps=4, warmup=0, schedule="constant")
    model = tiny_bert()
    _poison_loss_on_call(model, 3)  # step 3's forward
    with pytest.raises(FloatingPointError, match=r"the training loss is nan at step 3 \(epoch 0, batch 2\): "
                                                 r"stopped before that update, .*after step 2. Lower lr"):
        train(model, toy_classification(16), None, quiet(**cfg))
    assert all(p.grad is None for p in model.parameters())  # nothing half-accumulated is left
    twin = _two_steps(**cfg)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_nan_gradient_stops_the_run_before_it_reaches_the_weights():
    cfg = dict(lr=1e-2, batch_size=4, max_steps=4, warmup=0, schedule="constant")
    model = tiny_bert()
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 3 else grad

    model.classifier.weight.register_hook(poison)
    with pytest.raises(FloatingPointError, match=r"the gradient norm is nan at step 3 .*loss was finite"):
        train(model, toy_classification(16), None, quiet(**cfg))
    twin = _two_steps(**cfg)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


# --- evaluate: 2-D labels are not always a causal LM -------------------------------------------

def _token_classifier(seed: int = 0):
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=3)
    return BertForTokenClassification(cfg).eval()


def test_token_classification_is_scored_per_token_unshifted():
    """BertForTokenClassification: the logits at t score token t's own label (a causal shift would
    compare each token's prediction with its neighbour's tag)."""
    model = _token_classifier()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (4, 6), generator=g)
    tags = torch.randint(0, 3, (4, 6), generator=g)
    tags[0, :2] = -100  # e.g. special tokens carry no tag
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": tags.tolist()})
    scores = M.evaluate(model, data, batch_size=4)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.double()  # (B, T, 3)
    keep = tags != -100
    nll = -logits.log_softmax(-1).gather(-1, tags.clamp(min=0)[..., None])[..., 0][keep]
    assert scores["loss"] == pytest.approx(float(nll.mean()), rel=1e-5)
    assert scores["token_accuracy"] == pytest.approx(float((logits.argmax(-1) == tags)[keep].double().mean()))


def test_multi_label_targets_are_refused_with_their_shapes():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3, problem_type="multi_label_classification")).eval()
    data = Dataset.from_dict({"input_ids": [[5, 6, 7]] * 2, "attention_mask": [[1, 1, 1]] * 2,
                              "labels": [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]})
    with pytest.raises(ValueError, match=r"labels shaped \(2, 3\) with logits shaped \(2, 3\)"):
        M.evaluate(model, data)
