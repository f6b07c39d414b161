"""TrainConfig.head_lr: the modules_to_save copies (a fresh head) train at their own peak rate."""

from __future__ import annotations

import copy

import pytest
import torch
from train_helpers import record_group_lrs, tiny_bert, toy_classification

from peftlab.config import LoRAConfig, PrefixConfig
from peftlab.inject import inject
from peftlab.train import TrainConfig, lr_factor, param_groups, train

HEAD = "classifier.modules_to_save.default."


def _prefix_bert():
    return inject(tiny_bert(), PrefixConfig(num_virtual_tokens=2, projection=False, init="vocab",
                                            modules_to_save=("classifier",)))


def test_the_head_copy_gets_its_own_two_groups_and_nothing_else_moves():
    model = _prefix_bert()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    groups, names = param_groups(model, 0.1, head_lr_ratio=10)
    assert len(groups) == 4
    assert names[2] == [HEAD + "weight"] and names[3] == [HEAD + "bias"]  # decayed matrix, undecayed bias
    assert [g["weight_decay"] for g in groups[2:]] == [0.1, 0.0]
    assert [g["lr_scale"] for g in groups[2:]] == [10, 10] and all("lr_scale" not in g for g in groups[:2])
    assert sorted(n for g in names for n in g) == trainable  # nothing lost, nothing twice
    assert not any("modules_to_save" in n for n in names[0] + names[1])


def test_both_ratios_together_make_five_groups():
    model = inject(tiny_bert(), LoRAConfig(r=2, modules_to_save=("classifier",)))
    groups, names = param_groups(model, 0.0, loraplus_ratio=4, head_lr_ratio=10)
    assert [g.get("lr_scale", 1.0) for g in groups] == [1.0, 1.0, 4, 10, 10]
    assert all(".lora_B." in n for n in names[2]) and names[3] == [HEAD + "weight"]


def _one_step(model, head_lr):
    cfg = TrainConfig(lr=1e-3, batch_size=8, max_steps=1, warmup=0, schedule="constant", weight_decay=0.0,
                      max_grad_norm=None, head_lr=head_lr, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, toy_classification(8), None, cfg)
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def test_a_head_lr_ten_times_lr_moves_the_head_ten_times_as_far_in_adamws_first_step():
    start = _prefix_bert()
    plain, ten = _one_step(copy.deepcopy(start), None), _one_step(copy.deepcopy(start), 1e-2)
    for n in plain:
        if n.startswith(HEAD):
            torch.testing.assert_close(ten[n], 10 * plain[n], rtol=1e-5, atol=0)
        else:
            assert torch.equal(ten[n], plain[n]), n  # the prefix and every frozen weight alike
    # AdamW's first update is lr * g / (|g| + eps) per element: ~10 * lr for the head; at most lr for the
    # prefix (whose gradients in this tiny random model are small enough for eps to show)
    assert ten[HEAD + "weight"].abs().max().item() == pytest.approx(1e-2, rel=1e-3)
    assert 0 < ten["prefix_tuning.default.prefix_keys_values"].abs().max().item() <= 1e-3 * (1 + 1e-6)


@pytest.mark.parametrize("head_lr", [0, -1e-2, float("nan"), float("inf"), True, "1e-2"])
def test_a_head_lr_that_is_not_positive_is_refused(head_lr):
    with pytest.raises(ValueError, match=r"TrainConfig.head_lr must be None or a positive number, "
                                         r"got .*: use e.g. 1e-2"):
        TrainConfig(head_lr=head_lr)


def test_the_schedule_drives_the_head_lr_too(monkeypatch):
    seen = record_group_lrs(monkeypatch)
    train(_prefix_bert(), toy_classification(16), None, TrainConfig(lr=5e-2, head_lr=1e-2, batch_size=4, max_steps=5,
                                                                    warmup=2, progress=False))
    factors = [lr_factor(s, 5, 2, "linear") for s in range(5)]
    assert [row[0] for row in seen] == pytest.approx([5e-2 * f for f in factors])  # the prefix
    assert [row[2] for row in seen] == pytest.approx([1e-2 * f for f in factors])  # the head's weight
    assert [row[3] for row in seen] == pytest.approx([1e-2 * f for f in factors])  # and bias


def test_a_head_lr_without_a_head_copy_is_refused_before_training():
    model = inject(tiny_bert(), PrefixConfig(num_virtual_tokens=2, projection=False, init="vocab"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"TrainConfig.head_lr sets .*trains none.*modules_to_save=\('classifier',\).*"
                                         r"head_lr=None"):
        train(model, toy_classification(8), None, TrainConfig(max_steps=1, head_lr=1e-2, progress=False))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
