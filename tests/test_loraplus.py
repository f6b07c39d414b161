"""LoRA+ (Hayou et al. 2024): TrainConfig.loraplus_ratio trains LoRA's B matrices at lr * ratio."""

from __future__ import annotations

import copy

import pytest
import torch
from train_helpers import record_group_lrs, tiny_bert, toy_classification

from peftlab.config import AdapterConfig, LoRAConfig
from peftlab.inject import inject, set_active
from peftlab.train import TrainConfig, lr_factor, param_groups, train


def _lora_bert():
    return inject(tiny_bert(), LoRAConfig(r=2, modules_to_save=("classifier",)))


def _quiet(**kw) -> TrainConfig:
    kw.setdefault("progress", False)
    return TrainConfig(**kw)


def test_param_groups_put_exactly_the_b_matrices_in_their_own_group():
    model = _lora_bert()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    b_names = [n for n in trainable if ".lora_B." in n]
    assert len(b_names) == 4  # query and value in 2 layers
    groups, names = param_groups(model, 0.1, loraplus_ratio=16)
    assert len(groups) == 3 and sorted(names[2]) == sorted(b_names)
    assert groups[2]["lr_scale"] == 16 and groups[2]["weight_decay"] == 0.1
    assert all("lora_B" not in n for n in names[0] + names[1])
    assert sorted(n for g in names for n in g) == sorted(trainable)  # nothing lost, nothing twice
    assert [len(g["params"]) for g in groups] == [len(n) for n in names]
    plain, plain_names = param_groups(model, 0.1)  # no ratio: the two groups as before
    assert len(plain) == 2 and set(b_names) <= set(plain_names[0])


def test_the_schedule_scales_every_group_alike(monkeypatch):
    seen = record_group_lrs(monkeypatch)
    res = train(_lora_bert(), toy_classification(16), None,
                _quiet(lr=0.01, batch_size=4, max_steps=5, warmup=2, schedule="cosine", loraplus_ratio=8))
    expected = [0.01 * lr_factor(s, 5, 2, "cosine") for s in range(5)]
    assert [r["lr"] for r in res.history] == pytest.approx(expected)  # the history shows the base lr
    assert [len(row) for row in seen] == [3] * 5  # decayed, not decayed, B
    assert [x for row in seen for x in row] == pytest.approx([x for lr in expected for x in (lr, lr, 8 * lr)])


def _one_step(model, ratio):
    cfg = _quiet(lr=1e-3, batch_size=8, max_steps=1, warmup=0, schedule="constant", weight_decay=0.0,
                 max_grad_norm=None, loraplus_ratio=ratio)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, toy_classification(8), None, cfg)
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def test_b_moves_ratio_times_as_far_in_adamws_first_step():
    start = _lora_bert()
    plain, one, four = (_one_step(copy.deepcopy(start), r) for r in (None, 1, 4))
    b_names = [n for n in plain if ".lora_B." in n]
    for n in plain:
        assert torch.equal(one[n], plain[n]), n  # ratio 1 is the plain optimizer
        if n in b_names:
            torch.testing.assert_close(four[n], 4 * one[n], rtol=1e-5, atol=0)
        else:
            assert torch.equal(four[n], one[n]), n  # everything else (A, the head copy, frozen weights) alike
    # AdamW's first update is lr * g / (|g| + eps) = lr * sign(g) per element: B's is 4 * lr, the head's lr
    b = torch.cat([four[n].flatten() for n in b_names])
    head = one["classifier.modules_to_save.default.weight"].flatten()
    assert b.abs().max().item() == pytest.approx(4e-3, rel=1e-3)
    assert head.abs().max().item() == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("ratio", [0, -16, 0.0, float("nan"), float("inf"), True, "16"])
def test_a_ratio_that_is_not_positive_is_refused(ratio):
    with pytest.raises(ValueError, match=r"TrainConfig.loraplus_ratio must be None or a finite number > 0, "
                                         r"got .*: use e.g. 16"):
        TrainConfig(loraplus_ratio=ratio)


@pytest.mark.parametrize("make", [
    lambda: tiny_bert(),  # full fine-tuning: no LoRA at all
    lambda: inject(tiny_bert(), AdapterConfig(bottleneck=4)),  # another method
    lambda: _without_active(_lora_bert()),  # a LoRA adapter that is not trained
])
def test_a_ratio_without_lora_b_matrices_is_refused_before_training(make):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"loraplus_ratio=16 .*trains none.*inject a LoRA adapter.*"
                                         r"loraplus_ratio=None"):
        train(model, toy_classification(8), None, _quiet(max_steps=1, loraplus_ratio=16))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def _without_active(model):
    set_active(model, None)
    for n, p in model.named_parameters():  # train something, just not LoRA
        p.requires_grad = n.startswith("classifier.original_module")
    return model
