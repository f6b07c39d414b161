"""LoRA on the real embedded models (MiniLM, SmolLM2-135M) against HF peft."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from lora_helpers import randomize_lora_b

from peftlab.config import LoRAConfig
from peftlab.inject import inject, merge, unmerge
from peftlab.io import adapter_state_dict, load_adapter, save_adapter

pytestmark = pytest.mark.slow
TEXTS = ["LoRA keeps the base weights frozen.", "A tiny rank is often enough for a classifier head."]


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _check_against_peft(base, batch, tmp_path, targets, mts, task):
    base = copy.deepcopy(base).eval()  # the session fixture stays untouched
    ref = _logits(base, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=list(targets), modules_to_save=list(mts) if mts else None,
            task_type=task)).eval()  # a copy: peft appends "score" to the list it is given
    randomize_lora_b(pm, scale=0.05)
    ours = inject(copy.deepcopy(base), LoRAConfig(r=8, alpha=16, target_modules=targets,
                                                    modules_to_save=tuple(mts or ())))
    assert torch.equal(_logits(ours, batch), ref)  # exact identity at init
    theirs_sd = peft.get_peft_model_state_dict(pm)
    ours_sd = adapter_state_dict(ours)
    assert theirs_sd.keys() == ours_sd.keys()
    with torch.no_grad():
        for k, v in theirs_sd.items():
            ours_sd[k].copy_(v)
    expected = _logits(pm, batch)
    assert (expected - ref).abs().max() > 1e-3
    assert (_logits(ours, batch) - expected).abs().max() <= 1e-5
    unmerged = _logits(ours, batch)
    merge(ours)
    assert (_logits(ours, batch) - unmerged).abs().max() <= 1e-4 * max(1.0, unmerged.abs().max().item())
    unmerge(ours)
    # peftlab-saved -> peft, peft-saved -> peftlab
    save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert (_logits(back, batch) - expected).abs().max() <= 1e-5
    pm.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert (_logits(loaded, batch) - expected).abs().max() <= 1e-5


def test_minilm_matches_peft(minilm, tmp_path):
    model, tok = minilm
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    _check_against_peft(model, batch, tmp_path, ("query", "value"), ["classifier"], "SEQ_CLS")


def test_smollm2_matches_peft(smollm2, tmp_path):
    model, tok = smollm2
    batch = {"input_ids": tok(TEXTS[0], return_tensors="pt")["input_ids"]}
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    _check_against_peft(model, batch, tmp_path, ("q_proj", "v_proj"), None, "CAUSAL_LM")
