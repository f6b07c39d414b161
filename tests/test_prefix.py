"""Prefix-tuning and prompt tuning on tiny random models (peftlab/prefix.py, prompt.py, prefix_io.py).

Runs on the CPU, or on CUDA with PEFTLAB_DEVICE=cuda.
"""

import copy
import json
import os

import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, RobertaConfig, RobertaForSequenceClassification)

from peftlab import runtime
from peftlab.config import LoRAConfig, PrefixConfig, PromptTuningConfig
from peftlab.inject import configs, count_parameters, delete, disabled, inject, merge, set_active, unload
from peftlab.io import load_adapter, save_adapter
from peftlab.attention import extend_mask, record_attention
from peftlab.prefix import ATTN_NAME, PrefixEncoder, prefix_attention, prefix_visible, text_prefix
from peftlab.token_init import vocab_ids

DEVICE = runtime.get_device(os.environ.get("PEFTLAB_DEVICE", "cpu"))
M = 3  # virtual tokens in most tests


def _build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=101, max_position_embeddings=40, attn_implementation="eager")
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                             intermediate_size=64, num_hidden_layers=2, pad_token_id=0, **common))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=101, n_positions=40,
                                           pad_token_id=0, attn_implementation="eager"))
    elif kind == "bert":
        model = BertForSequenceClassification(BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=37,
                                                         num_hidden_layers=2, **common))
    elif kind == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(hidden_size=32, num_attention_heads=4, pad_token_id=1,
                                                               intermediate_size=37, num_hidden_layers=2, **common))
    else:
        model = DistilBertForSequenceClassification(DistilBertConfig(dim=32, n_heads=4, hidden_dim=37, n_layers=2,
                                                                     **common))
    return model.to(DEVICE).eval()


def _batch(pad_side="right"):
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    if pad_side == "left":
        ids, mask = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]]), torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    return ids.to(DEVICE), mask.to(DEVICE)


def _out(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


# -- the attention function against a float64 hand-written reference ------------------------
class _Attn(nn.Module):
    """Stands in for an attention layer: its module has no eager function, so the generic one runs."""

    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups


def _reference(q, k, v, pk, pv, mask, scaling):
    """Attention over [prefix ; keys], written with loops over batch and query heads (float64)."""
    B, H, T, hd = q.shape
    K, m = k.shape[1], pk.shape[1]
    out = torch.zeros(B, T, H, hd, dtype=torch.float64)
    probs = torch.zeros(B, H, T, m + k.shape[2], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // K)  # the key/value head this query head shares
            keys = torch.cat([pk[g], k[b, g]])  # (m + S, hd)
            vals = torch.cat([pv[g], v[b, g]])
            s = q[b, h] @ keys.T * scaling  # (T, m + S)
            s[:, m:] = s[:, m:].masked_fill(~mask[b], float("-inf"))  # padding hides real keys only
            p = torch.softmax(s, dim=-1)
            probs[b, h], out[b, :, h] = p, p @ vals
    return out, probs


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("own_eager", [False, True])
def test_attention_matches_float64_reference(heads, kv_heads, own_eager):
    torch.manual_seed(0)
    B, T, S, hd, m = 2, 3, 5, 8, 4
    q = torch.randn(B, heads, T, hd, dtype=torch.float64)
    k, v = torch.randn(2, B, kv_heads, S, hd, dtype=torch.float64)
    keep = torch.ones(B, T, S, dtype=torch.bool)
    keep[1, :, -2:] = False  # the second sequence has two padding keys
    root = nn.Module()
    root.prefix_tuning = nn.ModuleDict({"p": PrefixEncoder(1, kv_heads, hd, m, 16, dtype=torch.float64)})
    root.__dict__["peftlab_active"] = "p"
    module = _Attn(heads // kv_heads)
    if own_eager:  # run through Llama's own eager function, as a real Llama layer would
        module.__class__ = type("LlamaLike", (_Attn,), {"__module__": "transformers.models.llama.modeling_llama"})
    module.__dict__["peftlab_prefix_site"] = (root, 0)
    additive = torch.zeros(B, 1, T, S, dtype=torch.float64).masked_fill(~keep[:, None], torch.finfo(torch.float64).min)
    out, probs = prefix_attention(module, q, k, v, additive, scaling=hd ** -0.5)
    pk, pv = root.prefix_tuning["p"].layer_kv(0, 1)
    ref_out, ref_probs = _reference(q, k, v, pk[0].detach(), pv[0].detach(), keep, hd ** -0.5)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(probs, ref_probs)
    bool_out, _ = prefix_attention(module, q, k, v, keep[:, None], scaling=hd ** -0.5)  # boolean masks too
    torch.testing.assert_close(bool_out, ref_out)


def test_extend_mask_shapes_and_values():
    q = torch.zeros(2, 4, 3, 8)
    assert extend_mask(None, 2, None, q, 5) is None
    vis = torch.tensor([True, False])
    ext = extend_mask(None, 2, vis, q, 5)
    assert ext.shape == (1, 1, 3, 7) and (ext[..., 1] < -1e30).all() and (ext[..., [0, 2]] == 0).all()
    with pytest.raises(RuntimeError, match="covers 4 keys"):
        extend_mask(torch.zeros(2, 1, 3, 4), 2, None, q, 5)


# -- equality with HF peft -----------------------------------------------------------------
def _peft_twin(model, flat):
    from peft import PrefixTuningConfig, get_peft_model

    twin = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=M))
    with torch.no_grad():
        twin.prompt_encoder["default"].embedding.weight.copy_(flat)
    return twin.eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_equals_hf_peft_given_same_prefix(kind):
    base = _build(kind)
    ours = inject(copy.deepcopy(base), PrefixConfig(num_virtual_tokens=M, projection=False), "p")
    flat = ours.prefix_tuning["p"].flat().detach()
    assert flat.shape == (M, 2 * 2 * ours.prefix_tuning["p"].kv_heads * ours.prefix_tuning["p"].head_dim)
    twin = _peft_twin(base, flat)
    ids, mask = _batch("right")
    shifted = torch.arange(M, M + ids.shape[1], device=DEVICE).expand_as(ids)  # peft numbers tokens from m
    with torch.no_grad():
        theirs = twin(input_ids=ids, attention_mask=mask).logits
    mine = _out(ours, ids, mask, position_ids=shifted)
    torch.testing.assert_close(mine[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=1e-5)


def test_saved_decoder_prefix_loads_in_hf_peft(tmp_path):
    from peft import PeftModel

    base = _build("llama")
    ours = inject(copy.deepcopy(base), PrefixConfig(num_virtual_tokens=M, projection_hidden=8), "p")
    save_adapter(ours, tmp_path / "a", "p")  # the MLP is folded on the way out
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "PREFIX_TUNING" and meta["num_attention_heads"] == 2  # key/value heads (GQA)
    twin = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    ids, mask = _batch("right")
    with torch.no_grad():
        theirs = twin(input_ids=ids, attention_mask=mask).logits
    # default positions on both sides: the saved keys were rotated by m for peft's numbering
    torch.testing.assert_close(_out(ours, ids, mask)[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=1e-5)


# -- behaviour --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "llama", "gpt2"])
def test_masked_prefix_gives_base_outputs_and_padding_is_respected(kind):
    model = _build(kind)
    ids, mask = _batch("right")
    base = _out(model, ids, mask)
    inject(model, PrefixConfig(num_virtual_tokens=M), "p")
    assert model.config._attn_implementation == ATTN_NAME
    with_prefix = _out(model, ids, mask)
    assert (with_prefix - base).abs().max() > 1e-5  # the prefix does something
    with prefix_visible(model, torch.zeros(M, dtype=torch.bool)):
        torch.testing.assert_close(_out(model, ids, mask), base, atol=1e-6, rtol=0)
    short = _out(model, ids[1:, :3], mask[1:, :3])  # the padded row, without its padding
    row = with_prefix[1, :3] if with_prefix.dim() == 3 else with_prefix[1]
    torch.testing.assert_close(row, short[0], atol=1e-5, rtol=1e-5)
    with disabled(model):
        torch.testing.assert_close(_out(model, ids, mask), base, atol=1e-6, rtol=0)
    delete(model, "p")
    assert model.config._attn_implementation == "eager" and not hasattr(model, "prefix_tuning")
    assert not any("peftlab_prefix_site" in mod.__dict__ for mod in model.modules())
    torch.testing.assert_close(_out(model, ids, mask), base, atol=0, rtol=0)


def test_positions_unchanged_and_attention_includes_prefix():
    model = inject(_build("llama"), PrefixConfig(num_virtual_tokens=M), "p")
    ids, mask = _batch("right")
    plain = torch.arange(ids.shape[1], device=DEVICE).expand_as(ids)
    torch.testing.assert_close(_out(model, ids, mask), _out(model, ids, mask, position_ids=plain), atol=0, rtol=0)
    with torch.no_grad():
        att = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(att) == 2 and att[0].shape == (2, 6, 5, M + 5)
    torch.testing.assert_close(att[0].sum(-1), torch.ones(2, 6, 5, device=DEVICE))
    assert (att[0][1, :, :3, M + 3:] == 0).all()  # padding columns get nothing, prefix columns do
    assert (att[0][..., :M] > 0).all()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_cached_batched_left_padded_and_sampling(kind):
    model = _build(kind)
    ids, mask = _batch("left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    base = model.generate(input_ids=ids, attention_mask=mask, **kw)
    inject(model, PrefixConfig(num_virtual_tokens=M), "p")
    cached = model.generate(input_ids=ids, attention_mask=mask, **kw)
    uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    solo = model.generate(input_ids=ids[1:, 2:], attention_mask=mask[1:, 2:], **kw)  # row 2 without padding
    assert torch.equal(cached[1, 2:], solo[0])
    with disabled(model):
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kw), base)
    torch.manual_seed(1)
    sampled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0,
                             pad_token_id=0)
    torch.manual_seed(1)
    again = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0,
                           pad_token_id=0, use_cache=False)
    assert sampled.shape == (2, 11) and torch.equal(sampled, again)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = inject(_build("llama"), PrefixConfig(num_virtual_tokens=M), "p")
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        ids, mask = _batch("right")
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[0].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_only_prefix_parameters_change_after_a_step():
    model = inject(_build("bert"), PrefixConfig(num_virtual_tokens=M, projection_hidden=8), "p")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    ids, mask = _batch()
    model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1], device=DEVICE)).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, _ in model.named_parameters() if n.startswith("prefix_tuning.p.prefix_")}


def test_parameter_counts_flat_and_mlp_then_merge():
    model = _build("llama")  # L = 2 layers, 2 kv heads x head_dim 8 -> d_kv = 16, d = 48
    L, kv, d, h = 2, 16, 48, 10
    inject(model, PrefixConfig(num_virtual_tokens=M, projection_hidden=h), "p")
    mlp = M * d + (d * h + h) + (h * 2 * L * kv + 2 * L * kv)
    count = count_parameters(model)
    assert count.trainable == mlp and count.by_kind["prefix"] == mlp
    ids, mask = _batch()
    before = _out(model, ids, mask)
    merge(model)  # folds the MLP into flat prefixes
    assert count_parameters(model).trainable == 2 * L * M * kv
    torch.testing.assert_close(_out(model, ids, mask), before, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="already flat"):
        merge(model)
    with pytest.raises(RuntimeError, match="cannot merge it into the weights"):
        unload(model)
    assert "p" in configs(model)


def test_two_named_adapters_and_set_active():
    model = _build("bert")
    ids, mask = _batch()
    base = _out(model, ids, mask)
    inject(model, PrefixConfig(num_virtual_tokens=M), "a")
    inject(model, PromptTuningConfig(num_virtual_tokens=2), "b")
    out_b = _out(model, ids, mask)
    set_active(model, "a")
    out_a = _out(model, ids, mask)
    assert not torch.allclose(out_a, out_b)
    assert all(p.requires_grad == n.startswith("prefix_tuning.a.") for n, p in model.named_parameters())
    set_active(model, None)
    torch.testing.assert_close(_out(model, ids, mask), base, atol=0, rtol=0)
    delete(model, "a")
    delete(model, "b")
    torch.testing.assert_close(_out(model, ids, mask), base, atol=0, rtol=0)
    assert not model._forward_pre_hooks


def test_text_init_uses_the_frozen_models_keys_and_values():
    from peftlab import hub

    try:
        folder = hub.embedded_path("minilm")
    except (ModuleNotFoundError, FileNotFoundError):
        pytest.skip("needs the embedded MiniLM tokenizer")
    model = _build("bert")
    model.resize_token_embeddings(30522)  # MiniLM's vocabulary, so its tokenizer fits
    from transformers import AutoTokenizer

    words = "a great movie"
    ids = AutoTokenizer.from_pretrained(folder)(words, add_special_tokens=False)["input_ids"]
    want = (ids * 2)[:4]  # repeated to m = 4 tokens
    calls = record_attention(model, torch.tensor([want]))
    for projection in (False, True):
        m = copy.deepcopy(model)
        inject(m, PrefixConfig(num_virtual_tokens=4, projection=projection, projection_hidden=8,
                               init=f"text:{words}", tokenizer=str(folder)), "p")
        enc = m.prefix_tuning["p"]
        for layer, (_, _, k, v) in enumerate(calls):
            pk, pv = enc.layer_kv(layer, 1)
            torch.testing.assert_close(pk, k, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(pv, v, atol=1e-4, rtol=1e-4)
    p = inject(copy.deepcopy(model), PromptTuningConfig(num_virtual_tokens=4, init=f"text:{words}",
                                                         tokenizer=str(folder)), "q")
    torch.testing.assert_close(p.prompt_tuning["q"].prompt_embedding,
                               model.get_input_embeddings()(torch.tensor(want, device=DEVICE)))


# -- initialisation: the default starts at the base model ---------------------------------------
def _with_tokens_first(model, tokens, ids, mask, positions=None):
    """Base logits for ``tokens`` (m,) read before every row of ``ids``, at the input's positions."""
    m = tokens.shape[0]
    both = torch.cat([tokens.to(DEVICE).expand(ids.shape[0], m), ids], 1)  # (B, m + T)
    ext = torch.cat([torch.ones_like(mask[:, :m]).expand(ids.shape[0], m), mask], 1)
    with disabled(model), torch.no_grad():
        return model(input_ids=both, attention_mask=ext, position_ids=positions).logits[:, m:]  # (B, T, V)


def test_default_config_init_is_real_tokens_and_random_is_explicit():
    assert PrefixConfig().init == "auto" and PromptTuningConfig().init == "auto"
    for init in ("auto", "vocab", "random", "text:hello there"):
        assert PrefixConfig(init=init).init == PromptTuningConfig(init=init).init == init
    for bad in ("Random", "text:  ", "zeros", None):
        with pytest.raises(ValueError, match=r'init must be "auto", "vocab", "text:<some words>" or "random"'):
            PrefixConfig(init=bad)


@pytest.mark.parametrize("projection", [False, True])
def test_default_prefix_on_a_rotary_decoder_is_the_base_model_reading_the_tokens_first(projection):
    """Llama: prefix keys computed at positions -m..-1, so step 0 equals the base model on [tokens; input]."""
    model = _build("llama")
    ids, mask = _batch("right")
    inject(model, PrefixConfig(num_virtual_tokens=M, projection=projection, projection_hidden=8), "p")
    tokens = model.prefix_tuning["p"].init_ids  # no tokenizer for a random model: seeded vocabulary samples
    assert tokens.shape == (M,) and torch.equal(tokens, vocab_ids(model, M))
    want = _with_tokens_first(model, tokens, ids, mask)
    torch.testing.assert_close(_out(model, ids, mask)[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)


def test_default_prefix_on_gpt2_is_the_base_model_reading_the_tokens_first():
    """GPT-2 (learned absolute positions): the same, once the input is numbered from m as in the probe."""
    model = _build("gpt2")
    ids, mask = _batch("right")
    inject(model, PrefixConfig(num_virtual_tokens=M, projection=False), "p")
    tokens = model.prefix_tuning["p"].init_ids
    shifted = torch.arange(M, M + ids.shape[1], device=DEVICE).expand_as(ids)
    full = torch.arange(M + ids.shape[1], device=DEVICE).expand(ids.shape[0], -1)
    want = _with_tokens_first(model, tokens, ids, mask, positions=full)
    got = _out(model, ids, mask, position_ids=shifted)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "gpt2", "llama"])
def test_default_prefix_changes_outputs_far_less_than_random(kind):
    """Step 0 relative change of the last hidden states; measured default / random: bert 0.13, roberta 0.10,
    distilbert 0.20, gpt2 0.23, llama 0.57 (tiny random models attend almost uniformly, so the causal ones'
    first positions change a lot under any prefix; the exact tests above pin the decoders down)."""
    model = _build(kind)
    ids, mask = _batch("right")
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]

    def change(init):
        torch.manual_seed(0)
        m = inject(copy.deepcopy(model), PrefixConfig(num_virtual_tokens=M, projection=False, init=init), "p")
        with torch.no_grad():
            h = m(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        return float(((h - base).norm(dim=-1) / base.norm(dim=-1))[mask.bool()].mean())

    default, rand = change("auto"), change("random")
    assert 0 < default < (0.8 if kind == "llama" else 0.35) * rand
    if kind in ("bert", "roberta", "distilbert"):
        assert default < 0.01  # random: 0.025-0.031


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_fresh_prefix_takes_no_more_than_its_share_of_attention(kind):
    """Prefix columns come first; a real-token prefix is attended about like m more real tokens:
    share <= 1.1 * m / (m + visible real keys) (tiny random models: measured 1.00x)."""
    model = inject(_build(kind), PrefixConfig(num_virtual_tokens=M), "p")
    ids, mask = _batch("right")
    with torch.no_grad():
        att = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    keep = mask.bool()
    visible = (mask.cumsum(1) if kind == "llama" else mask.sum(1, keepdim=True).expand_as(mask)).float()
    fair = float((M / (M + visible))[keep].mean())
    for a in att:
        share = a[..., :M].sum(-1)  # (B, H, T)
        assert 0.5 * fair < float(share[keep[:, None].expand_as(share)].mean()) < 1.1 * fair


@pytest.mark.parametrize("first", ["lora", "prefix", "prompt"])
def test_init_probe_runs_the_bare_model_whatever_is_active(first):
    """The new prefix's keys/values are those of the bare model, even with another adapter active."""
    bare = _build("llama")
    model = copy.deepcopy(bare)
    ids, mask = _batch()
    base = _out(model, ids, mask)
    if first == "lora":
        inject(model, LoRAConfig(r=2, target_modules=("q_proj", "k_proj", "v_proj")), "a")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()  # a LoRA that changes keys and values
    elif first == "prefix":
        inject(model, PrefixConfig(num_virtual_tokens=2, init="random"), "a")
    else:
        inject(model, PromptTuningConfig(num_virtual_tokens=2), "a")
    T = ids.shape[1]  # a causal LM's prompt-tuned logits come with 2 more leading positions
    assert (_out(model, ids, mask)[:, -T:] - base).abs().max() > 1e-3  # the active adapter matters
    for projection in (False, True):
        name = f"new{int(projection)}"
        inject(model, PrefixConfig(num_virtual_tokens=M, projection=projection, projection_hidden=8), name)
        enc = model.prefix_tuning[name]
        torch.testing.assert_close(enc.flat(), text_prefix(bare, enc.init_ids), atol=1e-5, rtol=1e-5)
        set_active(model, "a")  # the next one is injected while "a" is active again
    assert all(not getattr(mod, "disabled", False) for mod in model.modules())  # the probe switched them back on
    set_active(model, "a")
    assert (_out(model, ids, mask)[:, -T:] - base).abs().max() > 1e-3


def test_mlp_default_init_reproduces_the_flat_prefix_and_merges_exactly():
    model = _build("bert")
    ids, mask = _batch()
    flat = inject(copy.deepcopy(model), PrefixConfig(num_virtual_tokens=M, projection=False), "p")
    inject(model, PrefixConfig(num_virtual_tokens=M, projection_hidden=8), "p")
    enc = model.prefix_tuning["p"]
    assert enc.projected and torch.equal(enc.init_ids, flat.prefix_tuning["p"].init_ids)
    target = flat.prefix_tuning["p"].prefix_keys_values
    torch.testing.assert_close(enc.flat(), target, atol=1e-5, rtol=1e-5)  # last layer solved by load_flat
    torch.testing.assert_close(_out(model, ids, mask), _out(flat, ids, mask), atol=1e-5, rtol=1e-5)
    for p in enc.parameters():  # after some training the MLP no longer reproduces the text; merge must stay exact
        p.data.add_(0.05 * torch.randn_like(p))
    produced, before = enc.flat().detach().clone(), _out(model, ids, mask)
    merge(model)
    assert not enc.projected and torch.equal(enc.prefix_keys_values, produced)
    torch.testing.assert_close(_out(model, ids, mask), before, atol=1e-6, rtol=1e-6)


def test_random_init_is_still_available_and_far_from_the_base():
    torch.manual_seed(0)
    model = inject(_build("llama"), PrefixConfig(num_virtual_tokens=8, projection=False, init="random"), "p")
    enc = model.prefix_tuning["p"]
    assert enc.init_ids is None and abs(float(enc.prefix_keys_values.std()) - 1) < 0.1  # N(0, 1)
    own = text_prefix(model, vocab_ids(model, 8))
    assert float(enc.prefix_keys_values.std()) > 5 * float(own.std())  # ~12x the model's own scale
    p = inject(_build("llama"), PromptTuningConfig(num_virtual_tokens=8, init="random"), "q")
    assert p.prompt_tuning["q"].init_ids is None
    emb = p.get_input_embeddings().weight
    assert 0.5 < float(p.prompt_tuning["q"].prompt_embedding.std() / emb.std()) < 2
    assert not any(torch.equal(row, e) for row in p.prompt_tuning["q"].prompt_embedding for e in emb)


def test_vocab_ids_are_seeded_in_range_and_skip_special_tokens():
    model = _build("gpt2")
    model.config.eos_token_id = model.config.bos_token_id = 77  # the tiny vocabulary's "special" id
    state = torch.random.get_rng_state()
    ids = vocab_ids(model, 60)
    assert torch.equal(torch.random.get_rng_state(), state)  # own generator: the global RNG is untouched
    assert torch.equal(ids, vocab_ids(model, 60)) and not torch.equal(ids, vocab_ids(model, 60, seed=1))
    assert len(set(ids.tolist())) == 60 and ids.min() >= 10 and ids.max() < 101  # skips vocab // 10 ids
    assert 77 not in ids.tolist() and 0 not in ids.tolist()
    assert vocab_ids(model, 200).shape == (200,)  # more than the vocabulary holds: drawn with replacement
    big = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=8, num_attention_heads=2, num_hidden_layers=1,
                                       intermediate_size=8))
    assert vocab_ids(big, 500).min() >= 1000  # special, unused and byte tokens sit below 1000 in real vocabularies


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_default_prompt_is_real_token_embeddings(kind):
    model = _build(kind)
    inject(model, PromptTuningConfig(num_virtual_tokens=M), "q")
    enc = model.prompt_tuning["q"]
    assert torch.equal(enc.init_ids, vocab_ids(model, M))
    torch.testing.assert_close(enc.prompt_embedding, model.get_input_embeddings()(enc.init_ids.to(DEVICE)))
    if kind == "llama":  # prompt tuning from tokens == the base model reading them == prefix-tuning from them
        ids, mask = _batch("right")
        got = _out(model, ids, mask)[:, M:]
        want = _with_tokens_first(model, enc.init_ids, ids, mask)
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)
        inject(model, PrefixConfig(num_virtual_tokens=M, projection=False), "p")
        torch.testing.assert_close(_out(model, ids, mask)[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)


# -- prompt tuning ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_prompt_tuning_equals_prepending_embeddings_by_hand(kind):
    model = _build(kind)
    ids, mask = _batch()
    embeds = model.get_input_embeddings()(ids)  # (B, T, d)
    inject(model, PromptTuningConfig(num_virtual_tokens=M), "q")
    prompt = model.prompt_tuning["q"].prompt_embedding  # (m, d)
    by_hand = torch.cat([prompt.expand(2, -1, -1), embeds], 1)  # (B, m + T, d)
    ext = torch.cat([torch.ones(2, M, dtype=mask.dtype, device=DEVICE), mask], 1)
    with disabled(model), torch.no_grad():
        want = model(inputs_embeds=by_hand, attention_mask=ext).logits
    torch.testing.assert_close(_out(model, ids, mask), want, atol=1e-6, rtol=1e-6)
    assert count_parameters(model).trainable == M * embeds.shape[-1]
    if kind == "llama":
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        labels = torch.cat([torch.full((2, M), -100, device=DEVICE), ids], 1)
        with disabled(model):
            torch.testing.assert_close(loss, model(inputs_embeds=by_hand, attention_mask=ext, labels=labels).loss)


def test_prompt_tuning_generate_batched_left_padded():
    model = inject(_build("llama"), PromptTuningConfig(num_virtual_tokens=M), "q")
    ids, mask = _batch("left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(cached, model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw))
    solo = model.generate(input_ids=ids[1:, 2:], attention_mask=mask[1:, 2:], **kw)
    assert torch.equal(cached[1, 2:], solo[0])


# -- saving and loading ---------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [PrefixConfig(num_virtual_tokens=M, projection_hidden=8, modules_to_save=("classifier",)),
                                 PromptTuningConfig(num_virtual_tokens=M, modules_to_save=("classifier",))])
def test_encoder_round_trip_is_exact(tmp_path, cfg):
    model = inject(_build("bert"), cfg, "x")
    with torch.no_grad():
        model.classifier.modules_to_save["x"].weight.add_(1.0)  # a trained head must come back too
    ids, mask = _batch()
    want = _out(model, ids, mask)
    save_adapter(model, tmp_path / "a", "x")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "peft_type" not in meta and meta["format"].startswith("peftlab-")
    fresh = load_adapter(_build("bert"), tmp_path / "a", "x")
    torch.testing.assert_close(_out(fresh, ids, mask), want, atol=0, rtol=0)


def test_prompt_saved_for_decoder_loads_in_hf_peft(tmp_path):
    from peft import PeftModel

    base = _build("llama")
    ours = inject(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=M), "q")
    save_adapter(ours, tmp_path / "a", "q")
    twin = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    ids, mask = _batch()
    with torch.no_grad():
        theirs = twin(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(_out(ours, ids, mask), theirs, atol=1e-5, rtol=1e-5)


# -- bad input: clear errors, model unchanged ----------------------------------------------
def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.config._attn_implementation,
            dict(configs(model)), [type(m) for m in model.modules()])


def _unchanged(model, snap):
    state, impl, regs, types = snap
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert (model.config._attn_implementation, dict(configs(model)), [type(m) for m in model.modules()]) == \
        (impl, regs, types)


@pytest.mark.parametrize("bad", [0, -2, True, 2.0])
def test_bad_num_virtual_tokens(bad):
    for cls in (PrefixConfig, PromptTuningConfig):
        with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int"):
            cls(num_virtual_tokens=bad)


def test_bad_projection_and_init():
    with pytest.raises(ValueError, match="projection_hidden must be a positive int"):
        PrefixConfig(projection_hidden=0)
    with pytest.raises(ValueError, match="init must be"):
        PrefixConfig(init="text:")
    model = _build("bert")
    snap = _snapshot(model)
    for init in ("text:hello", "auto", "vocab"):  # the MLP cannot reproduce 8 real tokens through 4 units
        with pytest.raises(ValueError, match="projection_hidden >= num_virtual_tokens"):
            inject(model, PrefixConfig(num_virtual_tokens=8, projection_hidden=4, init=init), "p")
    _unchanged(model, snap)
    inject(model, PrefixConfig(num_virtual_tokens=8, projection_hidden=4, init="random"), "p")  # nothing to solve


@pytest.mark.parametrize("cls", [PrefixConfig, PromptTuningConfig])
def test_too_long_for_the_model(cls):
    model = _build("bert")  # 40 positions
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="limit of 40 positions"):
        inject(model, cls(num_virtual_tokens=40), "p")
    _unchanged(model, snap)
    if cls is PromptTuningConfig:
        inject(model, cls(num_virtual_tokens=30), "p")
        ids = torch.ones(1, 11, dtype=torch.long, device=DEVICE)
        with pytest.raises(ValueError, match="exceed the model's limit of 40"):
            model(input_ids=ids)


def test_unsupported_architectures_say_what_they_need():
    with pytest.raises(TypeError, match="needs a transformers 5 model whose attention layers call"):
        inject(nn.Sequential(nn.Linear(2, 2)), PrefixConfig(), "p")
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                             vocab_size=50))
    snap = _snapshot(t5)
    with pytest.raises(TypeError, match="encoder-decoder"):
        inject(t5, PrefixConfig(num_virtual_tokens=2), "p")
    _unchanged(t5, snap)


def test_loading_into_a_model_of_another_shape_fails_cleanly(tmp_path):
    small = inject(_build("llama"), PrefixConfig(num_virtual_tokens=M, projection=False), "p")
    save_adapter(small, tmp_path / "a", "p")
    other = _build("gpt2")
    snap = _snapshot(other)
    with pytest.raises(ValueError, match=r"saved for 2 layers x 2 kv heads x head_dim 8.*needs \(3, 128\)"):
        load_adapter(other, tmp_path / "a", "p")
    _unchanged(other, snap)
