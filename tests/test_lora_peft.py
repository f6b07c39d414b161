"""peftlab LoRA against HF peft on tiny random models: same A and B => same numbers."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from lora_helpers import clone, ids, out, randomize_lora_b, targets, tiny

from peftlab.config import LoRAConfig
from peftlab.inject import count_parameters, inject, unload
from peftlab.io import adapter_state_dict

KINDS = ["bert", "roberta", "distilbert", "gpt2", "llama"]


def _peft_model(base, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notice for GPT-2's Conv1D
        return peft.get_peft_model(base, peft.LoraConfig(**kw)).eval()


def _copy_peft_into_peftlab(pm, model, name="default"):
    """Copy every adapter tensor from the peft model into the peftlab model (same keys)."""
    theirs = peft.get_peft_model_state_dict(pm)
    ours = adapter_state_dict(model, name)
    assert set(theirs) == set(ours)  # identical checkpoint keys
    with torch.no_grad():
        for k, v in theirs.items():
            ours[k].copy_(v)
    return theirs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rslora", [False, True])
def test_same_outputs_as_peft(kind, rslora):
    base, x = tiny(kind), ids()
    ref = out(base, x)
    pm = _peft_model(clone(base), r=4, lora_alpha=8, target_modules=list(targets(kind)), use_rslora=rslora)
    randomize_lora_b(pm)
    ours = inject(clone(base), LoRAConfig(r=4, alpha=8, target_modules=targets(kind), use_rslora=rslora))
    assert torch.equal(out(ours, x), ref)
    _copy_peft_into_peftlab(pm, ours)
    expected = out(pm, x)
    assert (expected - ref).abs().max() > 1e-4  # the adapter really does something (>> tolerance)
    assert (out(ours, x) - expected).abs().max() <= 1e-6
    trainable, _ = pm.get_nb_trainable_parameters()
    assert count_parameters(ours).trainable == trainable
    # merged forms agree too
    merged_theirs = out(pm.merge_and_unload(), x)
    merged_ours = out(unload(ours), x)
    assert (merged_ours - merged_theirs).abs().max() <= 1e-6


def test_same_init_as_peft_given_same_seed():
    base = tiny("bert")
    torch.manual_seed(123)
    pm = _peft_model(clone(base), r=4, lora_alpha=8, target_modules=["query", "value"])
    torch.manual_seed(123)
    ours = inject(clone(base), LoRAConfig(r=4, alpha=8))
    theirs = peft.get_peft_model_state_dict(pm)
    for k, v in adapter_state_dict(ours).items():
        assert torch.equal(v, theirs[k]), k


def test_modules_to_save_and_bias_match_peft():
    base, x = tiny("bert"), ids()
    pm = _peft_model(clone(base), r=4, lora_alpha=8, target_modules=["query", "value"],
                     modules_to_save=["classifier"], bias="lora_only")
    randomize_lora_b(pm)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad and "lora_" not in n:  # head copy and adapted-layer biases
                p.add_(0.3)
    ours = inject(clone(base), LoRAConfig(r=4, alpha=8, modules_to_save=("classifier",), bias="lora_only"))
    theirs = _copy_peft_into_peftlab(pm, ours)
    assert any(k.endswith("base_layer.bias") for k in theirs) and "base_model.model.classifier.weight" in theirs
    assert (out(ours, x) - out(pm, x)).abs().max() <= 1e-6
    ours_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    theirs_trainable = {n.removeprefix("base_model.model.") for n, p in pm.named_parameters() if p.requires_grad}
    assert ours_trainable == theirs_trainable  # same names => same state-dict layout


def test_gpt2_fused_conv1d_gradients_match_peft():
    base, x = tiny("gpt2"), ids(batch=3)
    pm = _peft_model(clone(base), r=4, lora_alpha=16, target_modules=["c_attn"])
    randomize_lora_b(pm, scale=0.1)
    ours = inject(clone(base), LoRAConfig(r=4, alpha=16, target_modules=("c_attn",)))
    _copy_peft_into_peftlab(pm, ours)
    for m in (pm, ours):
        m(input_ids=x, labels=x).loss.backward()
    g_theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                for n, p in pm.named_parameters() if p.requires_grad}
    g_ours = {n.replace(".default", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert g_theirs.keys() == g_ours.keys()
    for k in g_ours:
        assert torch.allclose(g_ours[k], g_theirs[k], atol=1e-6, rtol=1e-5), k
