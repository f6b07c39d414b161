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
    with torch.no_grad():
        theirs = twin(**ids).logits
        mine = model(**ids).logits  # default positions: save_adapter rotated the keys for peft's numbering
    # the rotated keys are rounded to float32 in the file; through 30 layers that leaves a few 1e-5 on
    # logits of size ~10 (the tiny-model tests in test_prefix_positions.py hold 1e-5); unrotated keys
    # at peft's default positions would be off by whole units
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-5)
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


# -- the default initialisation starts at the base model (measurements in the comments) --------
def _e2e_batch(tok, n=16):
    import peftlab

    rows = peftlab.data.tokenize_e2e(peftlab.load_e2e()["train"].select(range(n)), tok)
    return {k: v.to(DEVICE) for k, v in peftlab.data.PadCollator(tok, "right")([rows[i] for i in range(n)]).items()}


def _real(batch):
    return batch["attention_mask"].bool()


def _shares(attentions, keep, m):
    """Per layer: mean over real queries and heads of the attention on all prefix columns and on column 0."""
    sel = lambda a: a[keep[:, None].expand_as(a)]  # noqa: E731  (B, H, T) -> real queries
    return ([float(sel(a[..., :m].sum(-1)).mean()) for a in attentions],
            [float(sel(a[..., 0]).mean()) for a in attentions])


def test_smollm2_default_prefix_is_the_base_model_reading_a_phrase_first(smol):
    """16 E2E examples, m = 16. Measured: base loss 2.890; default ("auto": DEFAULT_PHRASE) 2.773 (-4.0%),
    flat and MLP alike; init="vocab" 3.114 (+7.8%); init="random" flat 9.34 (+223%), MLP 4.05 (+40%).
    Attention (mean over the 30 layers): the base model puts 0.539 on its first token (the attention sink);
    with the default prefix the prefix's first token takes that role (0.493) and the other 15 prefix
    columns get 0.071 (a fair share of 16 tokens would be 0.48), against 0.374 under random N(0, 1)
    prefixes (0.49 with the random MLP)."""
    from peftlab.prefix import DEFAULT_PHRASE

    model, tok = smol
    batch, m = _e2e_batch(tok), 16
    keep = _real(batch)
    with torch.no_grad():
        base = model(**batch, output_attentions=True)
    base_first = sum(_shares(base.attentions, keep, 1)[1]) / len(base.attentions)
    phrase = torch.tensor(tok(DEFAULT_PHRASE, add_special_tokens=False)["input_ids"][:m], device=DEVICE)
    with torch.no_grad():  # the base model reading the phrase and then each example (loss on the sentence only)
        ones = torch.ones(16, m, dtype=torch.long, device=DEVICE)
        reading = model(input_ids=torch.cat([phrase.expand(16, m), batch["input_ids"]], 1),
                        attention_mask=torch.cat([ones, batch["attention_mask"]], 1),
                        labels=torch.cat([torch.full_like(ones, -100), batch["labels"]], 1)).loss
    for projection in (True, False):
        inject(model, PrefixConfig(num_virtual_tokens=m, projection=projection), "p")
        try:
            assert model.prefix_tuning["p"].init_ids.tolist() == phrase.tolist()  # the model's own tokenizer
            with torch.no_grad():
                out = model(**batch, output_attentions=True)
        finally:
            delete(model, "p")
        torch.testing.assert_close(out.loss, reading, atol=1e-3, rtol=1e-3)  # exact up to float error
        assert abs(float(out.loss) / float(base.loss) - 1) < 0.06
        total, first = _shares(out.attentions, keep, m)
        rest = [t - f for t, f in zip(total, first)]
        assert sum(rest) / len(rest) < 0.15  # measured 0.071 (random: 0.37-0.49)
        assert abs(sum(first) / len(first) - base_first) < 0.1  # the sink moved, measured 0.493 vs 0.539
    torch.manual_seed(0)
    inject(model, PrefixConfig(num_virtual_tokens=m, projection=False, init="random"), "p")
    try:
        with torch.no_grad():
            assert float(model(**batch).loss) > 2 * float(base.loss)  # why random is no longer the default
    finally:
        delete(model, "p")


def test_smollm2_default_prompt_equals_the_default_prefix(smol):
    """Prompt tuning from the phrase's embeddings is the base model reading the phrase too (loss 2.773 vs
    base 2.890; init="random" at the embeddings' std: 2.922, init="vocab": 3.114)."""
    model, tok = smol
    batch = _e2e_batch(tok)
    inject(model, PromptTuningConfig(num_virtual_tokens=16), "q")
    try:
        with torch.no_grad():
            prompted = model(**batch).loss
    finally:
        delete(model, "q")
    inject(model, PrefixConfig(num_virtual_tokens=16, projection=False), "p")
    try:
        with torch.no_grad():
            prefixed = model(**batch).loss
    finally:
        delete(model, "p")
    torch.testing.assert_close(prompted, prefixed, atol=1e-3, rtol=1e-3)


def test_minilm_default_prefix_is_attended_like_real_tokens(minilm_copy):
    """32 Rotten Tomatoes validation sentences, m = 16, fresh 2-way head. Measured: loss 0.6925 vs base 0.6922;
    max |logit change| 0.015 (base logits reach 0.055; random flat 0.021, random MLP 0.016, vocab 0.032);
    [CLS] state change 0.27 (relative L2; random flat 0.32, random MLP 0.13, vocab 0.50); prefix share
    0.369 over the 6 layers, the 0.364 that 16 more real tokens would get (m / (m + visible tokens))."""
    import peftlab
    from peftlab.prefix import DEFAULT_PHRASE

    model, tok = minilm_copy
    rows = peftlab.data.tokenize_classification(peftlab.load_sentiment("rotten_tomatoes")["validation"]
                                                .select(range(32)), tok, 64)
    batch = peftlab.data.PadCollator(tok, "right")([{k: rows[i][k] for k in ("input_ids", "attention_mask", "labels")}
                                                    for i in range(32)])
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    keep, m = _real(batch), 16
    with torch.no_grad():
        base = model(**batch, output_hidden_states=True)
    inject(model, PrefixConfig(num_virtual_tokens=m, modules_to_save=("classifier",)), "p")
    try:
        assert model.prefix_tuning["p"].init_ids.tolist() == tok(DEFAULT_PHRASE, add_special_tokens=False)[
            "input_ids"][:m]
        with torch.no_grad():
            out = model(**batch, output_attentions=True, output_hidden_states=True)
    finally:
        delete(model, "p")
    assert abs(float(out.loss) / float(base.loss) - 1) < 0.01
    assert float((out.logits - base.logits).abs().max()) < 0.5 * float(base.logits.abs().max())
    h, h0 = out.hidden_states[-1][:, 0], base.hidden_states[-1][:, 0]
    assert float(((h - h0).norm(dim=-1) / h0.norm(dim=-1)).mean()) < 0.35
    fair = float((m / (m + batch["attention_mask"].sum(1, keepdim=True).expand_as(keep).float()))[keep].mean())
    total, _ = _shares(out.attentions, keep, m)
    assert max(total) < 1.15 * fair and sum(total) / len(total) < 1.1 * fair  # measured 0.402 max, 0.369 mean
