"""Bottleneck adapters on the real embedded models (MiniLM, SmolLM2): slow tests."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from peftlab.adapters import AdapterConfig, placement_parameters
from peftlab.config import LoRAConfig
from peftlab.inject import count_parameters, delete, disabled, inject, set_active
from peftlab.io import load_adapter, save_adapter

pytestmark = pytest.mark.slow
DEVICE = os.environ.get("PEFTLAB_DEVICE", "cpu")


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_minilm_placements_identity_counts_switching_and_saving(minilm, tmp_path):
    base_model, tok = minilm
    model = copy.deepcopy(base_model).to(DEVICE)
    batch = {k: v.to(DEVICE) for k, v in tok(["a quietly moving film", "dull and far too long"],
                                             padding=True, return_tensors="pt").items()}
    base = _logits(model, batch)
    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    for placement, b in (("houlsby", 8), ("pfeiffer", 16), ("parallel", 16)):
        inject(model, AdapterConfig(bottleneck=b, placement=placement, modules_to_save=("classifier",)), placement)
        assert torch.equal(_logits(model, batch), base)
        pc = count_parameters(model)
        head = sum(p.numel() for p in base_model.classifier.parameters())
        assert pc.trainable == placement_parameters(d, b, placement, layers) + head
    inject(model, LoRAConfig(r=8, modules_to_save=("classifier",)), "lora")
    with torch.no_grad():  # make every adapter do something
        for n, p in model.named_parameters():
            if "W_up" in n or "lora_B" in n:
                p.normal_(0, 0.05)
    outs = {}
    for name in ("houlsby", "pfeiffer", "parallel", "lora"):
        set_active(model, name)
        outs[name] = _logits(model, batch)
        assert not torch.allclose(outs[name], base)
    set_active(model, "pfeiffer")
    assert torch.equal(_logits(model, batch), outs["pfeiffer"])
    with disabled(model):
        assert torch.equal(_logits(model, batch), base)
    save_adapter(model, tmp_path / "houlsby", "houlsby")
    fresh = copy.deepcopy(base_model).to(DEVICE)
    load_adapter(fresh, tmp_path / "houlsby", "houlsby")
    assert torch.equal(_logits(fresh, batch), outs["houlsby"])
    for name in ("houlsby", "pfeiffer", "parallel", "lora"):
        delete(model, name)
    assert torch.equal(_logits(model, batch), base)
    assert set(model.state_dict()) == set(base_model.state_dict())


def test_minilm_adapter_training_lowers_loss_and_keeps_base(minilm):
    base_model, tok = minilm
    model = copy.deepcopy(base_model).to(DEVICE)
    texts = ["wonderful, warm and funny", "a tedious mess", "beautifully shot and acted", "boring and predictable"] * 2
    batch = {k: v.to(DEVICE) for k, v in tok(texts, padding=True, return_tensors="pt").items()}
    labels = torch.tensor([1, 0, 1, 0] * 2, device=DEVICE)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    inject(model, AdapterConfig(bottleneck=16, placement="houlsby", modules_to_save=("classifier",)), "a")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items() if k in state)


def test_smollm2_gqa_llama_identity_and_switch(smollm2):
    base_model, tok = smollm2
    model = copy.deepcopy(base_model).to(DEVICE)
    batch = {k: v.to(DEVICE) for k, v in tok(["The restaurant is"], return_tensors="pt").items()}
    base = _logits(model, batch)
    inject(model, AdapterConfig(reduction_factor=16, placement="houlsby"), "h")  # b = 576 // 16 = 36
    inject(model, AdapterConfig(bottleneck=32, placement="parallel"), "p")
    assert count_parameters(model).trainable == placement_parameters(576, 32, "parallel", 30)
    set_active(model, "h")
    assert count_parameters(model).trainable == placement_parameters(576, 36, "houlsby", 30)
    assert torch.equal(_logits(model, batch), base)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "W_up" in n:
                p.normal_(0, 0.02)
    assert not torch.allclose(_logits(model, batch), base)
    set_active(model, None)
    assert torch.equal(_logits(model, batch), base)
    delete(model, "h"), delete(model, "p")
    assert set(model.state_dict()) == set(base_model.state_dict())
