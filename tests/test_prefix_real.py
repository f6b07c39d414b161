"""Prefix-tuning and prompt tuning on the real embedded models (MiniLM, SmolLM2)."""

import copy
import os

import pytest
import torch

from peftlab import runtime
from peftlab.config import PrefixConfig, PromptTuningConfig
from peftlab.inject import count_parameters, delete, inject
from peftlab.io import load_adapter, save_adapter
from peftlab.prefix import prefix_visible

pytestmark = pytest.mark.slow
DEVICE = runtime.get_device(os.environ.get("PEFTLAB_DEVICE", "cpu"))


@pytest.fixture(scope="module")
def minilm_copy(minilm):
    model, tok = minilm
    return copy.deepcopy(model).to(DEVICE), tok


@pytest.fixture(scope="module")
def smol(smollm2):
    model, tok = smollm2
    tok = copy.deepcopy(tok)
    tok.padding_side = "left"
    return copy.deepcopy(model).to(DEVICE), tok


def test_hf_peft_prefix_tuning_fails_on_bert_but_ours_works(minilm_copy, tmp_path):
    from peft import PrefixTuningConfig, get_peft_model

    model, tok = minilm_copy
    batch = tok(["A gripping, beautifully acted film.", "Dull."], padding=True, return_tensors="pt").to(DEVICE)
    with pytest.raises(ValueError, match="does not support past key values"):
        get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))(**batch)
    with torch.no_grad():
        base = model(**batch).logits
    inject(model, PrefixConfig(num_virtual_tokens=8, init="text:a movie review", modules_to_save=("classifier",)), "p")
    try:
        assert count_parameters(model).by_kind["prefix"] == 8 * 384 + 384 * 256 + 256 + 256 * 2 * 6 * 384 + 2 * 6 * 384
        with torch.no_grad():
            out = model(**batch).logits
            alone = model(**tok(["Dull."], return_tensors="pt").to(DEVICE)).logits
            with prefix_visible(model, torch.zeros(8, dtype=torch.bool, device=DEVICE)):
                torch.testing.assert_close(model(**batch).logits, base, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], alone[0], atol=1e-5, rtol=1e-5)  # padding still respected
        save_adapter(model, tmp_path / "a", "p")
        with torch.no_grad():
            want = model(**batch).logits
    finally:
        delete(model, "p")
    load_adapter(model, tmp_path / "a", "p")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, want, atol=0, rtol=0)
    delete(model, "p")


def test_smollm2_generate_peft_round_trip_and_checkpointing(smol, tmp_path):
    from peft import PeftModel

    model, tok = smol
    base = copy.deepcopy(model)
    cfg = PrefixConfig(num_virtual_tokens=4, init="text:Describe the restaurant.")
    inject(model, cfg, "p")
    kv = model.config.num_key_value_heads * model.config.head_dim
    assert count_parameters(model).trainable == 4 * 576 + 576 * 256 + 256 + 256 * 2 * 30 * kv + 2 * 30 * kv
    prompts = ["Table: name : Aromi | food : Chinese\nSentence:", "Table: name : Zizzi\nSentence:"]
    batch = tok(prompts, padding=True, return_tensors="pt").to(DEVICE)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    cached = model.generate(**batch, **kw)
    assert torch.equal(cached, model.generate(**batch, use_cache=False, **kw))
    solo = model.generate(**tok(prompts[1:], return_tensors="pt").to(DEVICE), **kw)
    pad = int((batch["attention_mask"][1] == 0).sum())
    assert torch.equal(cached[1, pad:], solo[0])
    save_adapter(model, tmp_path / "a", "p")
    twin = PeftModel.from_pretrained(base, tmp_path / "a").eval()
    ids = tok(prompts[:1], return_tensors="pt").to(DEVICE)
    T = ids["input_ids"].shape[1]
    with torch.no_grad():
        theirs = twin(**ids).logits
        mine = model(**ids, position_ids=torch.arange(4, 4 + T, device=DEVICE)[None]).logits
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    model.activation_checkpointing_enable()
    model.train()
    labels = ids["input_ids"]
    model(**ids, labels=labels).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    model.activation_checkpointing_disable()
    model.eval()
    delete(model, "p")


def test_smollm2_prompt_tuning_generates(smol):
    model, tok = smol
    inject(model, PromptTuningConfig(num_virtual_tokens=4, init="text:Describe the restaurant."), "q")
    try:
        batch = tok(["Table: name : Aromi\nSentence:", "Hi"], padding=True, return_tensors="pt").to(DEVICE)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert torch.equal(model.generate(**batch, **kw), model.generate(**batch, use_cache=False, **kw))
    finally:
        delete(model, "q")
