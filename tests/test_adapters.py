"""Bottleneck adapters, several named adapters on one model, and the unified view (tiny models).

Runs on the CPU, or on CUDA with PEFTLAB_DEVICE=cuda.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import transformers as T

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peftlab import adapters, unified  # noqa: E402
from peftlab.adapters import AdapterBank, Bottleneck, placement_parameters, adapter_sites  # noqa: E402
from peftlab.config import AdapterConfig, LoRAConfig  # noqa: E402
from peftlab.inject import configs, count_parameters, delete, disabled, inject, merge, set_active, unload  # noqa: E402
from peftlab.io import load_adapter, save_adapter  # noqa: E402
from peftlab.runtime import get_device  # noqa: E402

DEVICE = get_device(os.environ.get("PEFTLAB_DEVICE", "cpu"))
V, D, L, B = 97, 32, 2, 4
PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
FACTORIES = {
    "bert": lambda: T.BertForSequenceClassification(T.BertConfig(
        hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=64, vocab_size=V,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
        hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=64, vocab_size=V,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    "distilbert": lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
        dim=D, n_layers=L, n_heads=4, hidden_dim=64, vocab_size=V, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(
        n_embd=D, n_layer=L, n_head=4, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=D, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=V, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)),
}


def tiny(kind: str = "bert", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FACTORIES[kind]().eval().to(DEVICE)


def ids(batch: int = 2, seq: int = 9) -> torch.Tensor:
    return torch.randint(1, V, (batch, seq), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def out(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def wake(model, name: str, seed: int = 3) -> None:
    """Give adapter ``name`` non-zero up-projections so that it changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{name}." in n and "adapter_" in n and ("W_up" in n or "b_up" in n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def snapshot(model):
    """Everything that defines the model: its tensors and its module types."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m).__name__) for n, m in model.named_modules()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


def assert_same(model, snap) -> None:
    state, types, hooks = snapshot(model)
    assert types == snap[1] and hooks == snap[2]
    assert state.keys() == snap[0].keys()
    assert all(torch.equal(state[k], snap[0][k]) for k in state)


# -- identity, placement, counts ------------------------------------------------------------
@pytest.mark.parametrize("kind", list(FACTORIES))
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_identity_at_init_and_adapter_changes_output(kind, placement):
    model, x = tiny(kind), ids()
    base = out(model, x)
    inject(model, AdapterConfig(bottleneck=B, placement=placement), name="a")
    assert torch.equal(out(model, x), base)  # W_up = b_up = 0 => exactly the base model
    wake(model, "a")
    assert not torch.allclose(out(model, x), base)
    with disabled(model):
        assert torch.equal(out(model, x), base)


@pytest.mark.parametrize("kind", list(FACTORIES))
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_parameter_count_formula(kind, placement):
    model = tiny(kind)
    frozen = sum(p.numel() for p in model.parameters())
    inject(model, AdapterConfig(bottleneck=B, placement=placement), name="a")
    per = 2 * D * B + B + D
    sites = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}[placement]
    pc = count_parameters(model)
    assert pc.by_kind["adapter"] == pc.trainable == per * sites * L == placement_parameters(D, B, placement, L)
    assert pc.total == frozen + pc.trainable
    assert all("adapter_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_bottleneck_sized_by_hidden_size_and_reduction_factor():
    model = tiny("distilbert")
    inject(model, AdapterConfig(reduction_factor=8, placement="houlsby"), name="a")  # b = 32 // 8 = 4
    for _, _, mod in adapter_sites(model, "houlsby"):
        bank = next(m for m in mod.children() if isinstance(m, AdapterBank))
        assert tuple(bank["a"].W_down.shape) == (4, D) and tuple(bank["a"].W_up.shape) == (D, 4)
    assert AdapterConfig(reduction_factor=16).bottleneck_size(384) == 24
    assert AdapterConfig().bottleneck_size(576) == 64


def test_bert_placements_match_hand_computation():
    """Houlsby: LN(h + A(h) + x) with h = dropout(dense(.)); parallel: LN(FFN(x) + x + s A'(x))."""
    torch.manual_seed(0)
    model = tiny("bert")
    layer = model.bert.encoder.layer[0]
    x = torch.randn(2, 5, D, device=DEVICE)
    inject(model, AdapterConfig(bottleneck=B, placement="houlsby", activation="tanh"), name="h")
    inject(model, AdapterConfig(bottleneck=B, placement="parallel", scaling=2.0), name="p")
    wake(model, "h"), wake(model, "p")
    att, ffn = layer.attention.output, layer.output

    def adapter(bank_owner, role, name, h):
        a = bank_owner._modules[f"adapter_{role}"][name]
        return a.scaling * (torch.nn.functional.linear(
            adapters.ACTIVATIONS[a.activation](h @ a.W_down.T + a.b_down), a.W_up, a.b_up))

    with torch.no_grad():
        set_active(model, "h")
        h = att.dense(x)
        want = att.LayerNorm(h + adapter(att.dropout, "attn", "h", h) + x)
        torch.testing.assert_close(att(x, x), want)
        inter = layer.intermediate(x)
        h = ffn.dense(inter)
        torch.testing.assert_close(ffn(inter, x), ffn.LayerNorm(h + adapter(ffn.dropout, "ffn", "h", h) + x))
        set_active(model, "p")
        torch.testing.assert_close(ffn(inter, x), ffn.LayerNorm(h + x + adapter(ffn, "par", "p", x)))
        torch.testing.assert_close(att(x, x), att.LayerNorm(att.dense(x) + x))  # parallel: attention untouched


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_pre_norm_block_placements_match_hand_computation(kind):
    """Pre-norm block, MLP part: x + m + A(m) (serial, m = MLP(LN(x))) or x + m + s A'(LN(x)) (parallel)."""
    model = tiny(kind)
    block = model.transformer.h[0] if kind == "gpt2" else model.model.layers[0]
    mlp = block.mlp
    norm = block.ln_2 if kind == "gpt2" else block.post_attention_layernorm
    inject(model, AdapterConfig(bottleneck=B, placement="pfeiffer"), name="s")
    inject(model, AdapterConfig(bottleneck=B, placement="parallel"), name="p")
    wake(model, "s"), wake(model, "p")
    x = torch.randn(2, 5, D, device=DEVICE)
    with torch.no_grad():
        n = norm(x)
        with disabled(model):
            m = mlp(n)
        set_active(model, "s")
        torch.testing.assert_close(x + mlp(n), x + m + mlp.adapter_ffn["s"](m))
        set_active(model, "p")
        torch.testing.assert_close(x + mlp(n), x + m + mlp.adapter_par["p"](n))
        assert mlp.adapter_par["p"].scaling == 4.0


# -- training -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_optimizer_step_changes_only_adapter_and_saved_head(kind):
    model = tiny(kind)
    saves = ("classifier",) if kind == "bert" else ()
    inject(model, AdapterConfig(bottleneck=B, placement="houlsby", modules_to_save=saves), name="a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):  # W_up gets a gradient first, then W_down too
        logits = model(input_ids=ids()).logits
        logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".adapter_" in k or ".modules_to_save.a." in k for k in changed)
    assert any("W_down" in k for k in changed) and any("W_up" in k for k in changed)
    if saves:
        assert any(".modules_to_save.a." in k for k in changed)


# -- several named adapters -----------------------------------------------------------------
def test_switch_disable_delete_restore_exact_base_outputs():
    model, x = tiny("bert"), ids()
    base, snap = out(model, x), snapshot(model)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    outs = {}
    for name, placement in zip(("h", "f", "p"), PLACEMENTS):
        inject(model, AdapterConfig(bottleneck=B, placement=placement), name=name)
        wake(model, name, seed=len(outs))
        outs[name] = out(model, x)
    assert list(configs(model)) == ["h", "f", "p"]
    for name in ("h", "p", "f", "h"):
        set_active(model, name)
        assert torch.equal(out(model, x), outs[name])
    set_active(model, None)
    assert torch.equal(out(model, x), base)
    set_active(model, "p")
    with disabled(model):
        assert torch.equal(out(model, x), base)
    assert torch.equal(out(model, x), outs["p"])
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_weights.items())  # switching changed no base weight
    delete(model, "p")
    assert torch.equal(out(model, x), base)  # the active one deleted: base model
    set_active(model, "f")
    assert torch.equal(out(model, x), outs["f"])
    delete(model, "h"), delete(model, "f")
    assert torch.equal(out(model, x), base)
    assert_same(model, snap)  # no bank, hook or wrapper left behind


def test_lora_and_adapter_on_one_model():
    x = ids()
    lone_lora, lone_adapter = tiny("gpt2"), tiny("gpt2")
    inject(lone_lora, LoRAConfig(r=2, target_modules=("c_attn",)), "lora")
    inject(lone_adapter, AdapterConfig(bottleneck=B), "ad")
    torch.manual_seed(5)
    for m in (lone_lora, lone_adapter):
        for p in m.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p.data, std=0.2)
    model = tiny("gpt2")
    base = out(model, x)
    inject(model, LoRAConfig(r=2, target_modules=("c_attn",)), "lora")
    inject(model, AdapterConfig(bottleneck=B), "ad")
    trained = {**dict(lone_lora.named_parameters()), **dict(lone_adapter.named_parameters())}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "adapter_" in n:
                p.copy_(trained[n])
    set_active(model, "lora")
    assert torch.equal(out(model, x), out(lone_lora, x))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if "lora_" in n}
    set_active(model, "ad")
    assert torch.equal(out(model, x), out(lone_adapter, x))
    assert all("adapter_" in n for n, p in model.named_parameters() if p.requires_grad)
    set_active(model, None)
    assert torch.equal(out(model, x), base)
    delete(model, "lora")
    set_active(model, "ad")
    assert torch.equal(out(model, x), out(lone_adapter, x))


def test_merge_and_unload_refused_model_unchanged():
    model = tiny("bert")
    inject(model, AdapterConfig(bottleneck=B), "a")
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="cannot be folded"):
        merge(model)
    with pytest.raises(RuntimeError, match="peftlab.delete"):
        unload(model)
    assert_same(model, snap)


def test_deepcopy_is_independent():
    model, x = tiny("llama"), ids()
    inject(model, AdapterConfig(bottleneck=B, placement="parallel"), "a")
    twin = copy.deepcopy(model)
    wake(twin, "a")
    assert not torch.equal(out(twin, x), out(model, x))
    delete(twin, "a")  # removes the copy's hooks, not the original's
    wake(model, "a")
    assert not torch.equal(out(model, x), out(twin, x))


# -- save / load ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_save_load_exact(tmp_path, kind):
    x = ids()
    saves = ("classifier",) if kind == "bert" else ()
    model = tiny(kind)
    inject(model, AdapterConfig(bottleneck=B, placement="houlsby", activation="gelu", modules_to_save=saves), "s")
    wake(model, "s")
    if saves:
        with torch.no_grad():
            model.classifier.modules_to_save["s"].weight.add_(1.0)
    want = out(model, x)
    save_adapter(model, tmp_path / "s", "s")
    meta = json.loads((tmp_path / "s" / "adapter_config.json").read_text())
    ours = json.loads((tmp_path / "s" / "peftlab_adapter.json").read_text())
    assert meta["format"] == "peftlab-adapter" and ours["config"]["method"] == "adapter"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                                "peftlab_adapter.json"]
    fresh = tiny(kind)
    load_adapter(fresh, tmp_path / "s", "task")
    assert torch.equal(out(fresh, x), want)
    assert configs(fresh)["task"] == configs(model)["s"]


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"bottleneck": 0}, ["bottleneck", "0", "positive"]),
    ({"bottleneck": -3}, ["bottleneck", "-3"]),
    ({"bottleneck": 2.5}, ["bottleneck", "2.5"]),
    ({"bottleneck": 8, "reduction_factor": 4}, ["not both"]),
    ({"reduction_factor": 0.5}, ["reduction_factor", "0.5"]),
    ({"placement": "sideways"}, ["placement", "sideways", "houlsby"]),
    ({"activation": "softplus"}, ["activation", "softplus", "relu"]),
    ({"init": "zeros"}, ["init", "near-identity"]),
    ({"scaling": 0}, ["scaling"]),
    ({"modules_to_save": "classifier"}, ["modules_to_save"]),
])
def test_config_rejects_bad_values(kwargs, words):
    with pytest.raises(ValueError) as err:
        AdapterConfig(**kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize("config, error, words", [
    (AdapterConfig(bottleneck=D + 1), ValueError, ["bottleneck", "got 33", "d=32", "bottleneck <= 32"]),
    (AdapterConfig(), ValueError, ["default 64", "d=32"]),
    (AdapterConfig(reduction_factor=64), ValueError, ["reduction_factor", "<= 32"]),
    (AdapterConfig(bottleneck=B, modules_to_save=("nope",)), ValueError, ["nope"]),
])
def test_bad_injection_leaves_model_unchanged(config, error, words):
    model = tiny("bert")
    snap = snapshot(model)
    with pytest.raises(error) as err:
        inject(model, config, "a")
    assert all(w in str(err.value) for w in words), str(err.value)
    assert_same(model, snap)
    assert not configs(model)


def test_unsupported_architecture_names_the_sublayers():
    model = T.T5ForConditionalGeneration(T.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=V,
                                                    d_kv=8))
    snap = snapshot(model)
    with pytest.raises(TypeError) as err:
        inject(model, AdapterConfig(bottleneck=2), "a")
    msg = str(err.value)
    assert all(w in msg for w in ("'t5'", "attention sub-layer", "feed-forward", "register_architecture"))
    assert_same(model, snap)


def test_duplicate_and_unknown_names_list_existing():
    model = tiny("bert")
    inject(model, AdapterConfig(bottleneck=B), "sentiment")
    inject(model, LoRAConfig(r=2), "topic")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already injected"):
        inject(model, AdapterConfig(bottleneck=B), "sentiment")
    for fn in (set_active, delete):
        with pytest.raises(ValueError) as err:
            fn(model, "sentimnet")
        assert "sentimnet" in str(err.value) and "['sentiment', 'topic']" in str(err.value)
    assert_same(model, snap)


@pytest.mark.parametrize("other", ["wider", "deeper", "bottleneck", "arch"])
def test_load_into_another_shape_fails_model_unchanged(tmp_path, other):
    model = tiny("bert")
    inject(model, AdapterConfig(bottleneck=B), "a")
    save_adapter(model, tmp_path / "a", "a")
    if other == "arch":
        target = tiny("gpt2")
    else:
        size = {"wider": dict(hidden_size=48), "deeper": dict(num_hidden_layers=3), "bottleneck": {}}[other]
        torch.manual_seed(0)
        target = T.BertForSequenceClassification(T.BertConfig(**{
            **dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=64, vocab_size=V),
            **size})).eval()
    if other == "bottleneck":  # a file whose tensors disagree with its own config
        from safetensors.torch import load_file, save_file
        t = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
        t["layers.0.attn.W_down"] = torch.zeros(B + 1, D)
        save_file(t, str(tmp_path / "a" / "adapter_model.safetensors"))
    snap = snapshot(target)
    with pytest.raises(ValueError) as err:
        load_adapter(target, tmp_path / "a", "a")
    assert "does not fit" in str(err.value), str(err.value)
    assert_same(target, snap)
    assert not configs(target)


# -- building blocks and the unified view -----------------------------------------------------
def test_bottleneck_module_formula_float64():
    torch.manual_seed(0)
    a = Bottleneck(6, 3, "silu", 2.0, dtype=torch.float64)
    torch.nn.init.normal_(a.W_up), torch.nn.init.normal_(a.b_up)
    h = torch.randn(4, 6, dtype=torch.float64)
    z = torch.nn.functional.silu(h @ a.W_down.T + a.b_down)
    torch.testing.assert_close(a(h), 2.0 * (z @ a.W_up.T + a.b_up))
    assert sum(p.numel() for p in a.parameters()) == 2 * 6 * 3 + 3 + 6


def test_half_precision_base_keeps_fp32_adapters():
    model, x = tiny("llama").to(torch.bfloat16), ids()
    inject(model, AdapterConfig(bottleneck=B, placement="parallel"), "a")
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "adapter_" in n)
    wake(model, "a")
    assert out(model, x).dtype == torch.bfloat16


@pytest.mark.parametrize("masked", [False, True])
def test_prefix_attention_is_gated_parallel_adapter_float64(masked):
    g = torch.Generator().manual_seed(0)
    B_, H, n, m, hd = 2, 3, 5, 4, 8
    q, k, v = (torch.randn(B_, H, n, hd, generator=g, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.randn(H, m, hd, generator=g, dtype=torch.float64) for _ in range(2))
    mask = None
    if masked:  # causal: query i sees keys 0..i
        mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    direct = unified.attention_with_prefix(q, k, v, pk, pv, mask)
    gated = unified.gated_parallel_form(q, k, v, pk, pv, mask)
    torch.testing.assert_close(direct, gated, rtol=1e-12, atol=1e-12)
    lam = unified.prefix_gate(q, k, pk, mask)
    zp = (q @ pk.transpose(-1, -2) / hd**0.5).exp().sum(-1, keepdim=True)
    sk = q @ k.transpose(-1, -2) / hd**0.5 + (0 if mask is None else mask)
    torch.testing.assert_close(lam, zp / (zp + sk.exp().sum(-1, keepdim=True)), rtol=1e-12, atol=1e-12)
    assert ((lam > 0) & (lam < 1)).all()


def test_prefix_term_is_an_adapter_with_bottleneck_m_float64():
    g = torch.Generator().manual_seed(1)
    d, hd, m = 12, 4, 3
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    w_q = torch.randn(hd, d, generator=g, dtype=torch.float64)
    pk, pv = (torch.randn(m, hd, generator=g, dtype=torch.float64) for _ in range(2))
    b_q = torch.randn(hd, generator=g, dtype=torch.float64)
    w_down, b_down, w_up = unified.prefix_as_adapter(w_q, pk, pv, b_q=b_q)
    assert w_down.shape == (m, d) and b_down.shape == (m,) and w_up.shape == (hd, m)
    torch.testing.assert_close(unified.attention(x @ w_q.T + b_q, pk, pv),
                               (x @ w_down.T + b_down).softmax(-1) @ w_up.T, rtol=1e-12, atol=1e-12)


def test_prefix_helper_agrees_with_peftlab_prefix_eager_attention_float64():
    from peftlab.attention import generic_eager

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    module = torch.nn.Module().eval()
    got, _ = generic_eager(module, q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), None)  # (B, n, H, hd)
    torch.testing.assert_close(got.transpose(1, 2), unified.gated_parallel_form(q, k, v, pk, pv))
