"""NF4 quantization and the 4-bit linear layer (QLoRA, Dettmers et al. 2023, arXiv:2305.14314)."""

import copy

import pytest
import torch
from torch import nn

import peftlab
from peftlab.quant import (Linear4bit, bits_per_parameter, dequantize_model, dequantize_nf4, nf4_code,
                           quantize_model, quantize_nf4)

# bitsandbytes' published NF4 table: an independent reference for nf4_code()
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


def _indices(q):
    return torch.stack([q.packed >> 4, q.packed & 0x0F], dim=1).view(-1).long()  # (n,)


def test_code_is_the_published_nf4_table():
    code = nf4_code()
    assert code.shape == (16,) and code.dtype == torch.float32
    torch.testing.assert_close(code, torch.tensor(BNB_NF4), atol=1e-6, rtol=0)
    assert (code == 0).sum() == 1 and torch.all(code[1:] > code[:-1])


def test_round_trip_error_bound():
    torch.manual_seed(0)
    w = torch.randn(64, 512)  # 512 blocks of 64 -> 2 groups of 256 absmax values
    q = quantize_nf4(w, block_size=64, double_quant=True)
    err = (dequantize_nf4(q) - w).abs().view(-1, 64)  # (blocks, 64)
    # w = a*x with |x| <= 1, w_hat = a_hat*c with c the code nearest x, |c| <= 1:
    #   |a_hat*c - a*x| <= a*|c - x| + |a_hat - a|*|c| <= a*gap/2 + |a_hat - a|,
    # gap = the largest distance between neighbouring codes; double quantization rounds a - mean to
    # the nearest multiple of its group's scale s, so |a_hat - a| <= s/2 (plus float32 rounding).
    code = nf4_code()
    gap = (code[1:] - code[:-1]).max()
    a = w.view(-1, 64).abs().amax(dim=1)  # (blocks,) true absmax
    s = q.absmax_scale.repeat_interleave(256)[: a.numel()]  # (blocks,) each block's group scale
    bound = a * gap / 2 + s / 2 + 1e-6
    assert torch.all(err <= bound[:, None])
    # without double quantization the scale term goes away
    q1 = quantize_nf4(w, double_quant=False)
    err1 = (dequantize_nf4(q1) - w).abs().view(-1, 64)
    assert torch.all(err1 <= (a * gap / 2 + 1e-6)[:, None])


def test_index_is_the_nearest_code_value_float64():
    torch.manual_seed(1)
    w = torch.randn(16, 64, dtype=torch.float64)
    q = quantize_nf4(w, double_quant=False)
    x = (w.view(-1, 64) / w.view(-1, 64).abs().amax(dim=1, keepdim=True)).view(-1)  # (n,) in [-1, 1]
    code = nf4_code().double()
    dist = (x[:, None] - code[None, :]).abs()  # (n, 16)
    chosen = dist.gather(1, _indices(q)[:, None]).squeeze(1)
    assert torch.all(chosen <= dist.min(dim=1).values + 1e-12)
    assert dequantize_nf4(q).dtype == torch.float64


def test_packing_and_bits_per_parameter():
    w = torch.zeros(2, 64)
    w[0, 0], w[0, 1] = 1.0, -1.0  # element 0 -> code 15 (high nibble), element 1 -> code 0 (low nibble)
    q = quantize_nf4(w, double_quant=False)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == w.numel() // 2
    assert q.packed[0] == 15 << 4 and torch.all(dequantize_nf4(q)[1] == 0)  # all-zero block stays zero
    big = torch.randn(256, 1024)  # 4096 blocks of 64 = 16 groups of 256
    dq = quantize_nf4(big, block_size=64, double_quant=True)
    n = big.numel()
    assert bits_per_parameter(dq) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n)  # + the one mean
    assert bits_per_parameter(quantize_nf4(big, double_quant=False)) == pytest.approx(4 + 32 / 64)
    assert dq.absmax.dtype == torch.int8 and dq.absmax_scale.numel() == 16


def test_linear4bit_matches_dequantized_linear_forward_and_grad():
    torch.manual_seed(2)
    lin = nn.Linear(64, 48)
    q4 = Linear4bit.from_linear(lin)
    ref = q4.to_linear()
    assert isinstance(ref, nn.Linear) and (q4.in_features, q4.out_features) == (64, 48)
    assert not list(n for n, p in q4.named_parameters() if p.requires_grad)  # bias frozen, weight a buffer
    assert {n for n, _ in q4.named_buffers()} == {"packed", "absmax", "absmax_scale", "absmax_mean"}
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = q4(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=0)
    assert q4.bias.grad is None and all(b.grad is None for b in q4.buffers())
    # a trainable bias (LoRAConfig(bias="all")) gets its gradient
    q4.bias.requires_grad_(True)
    q4(x).backward(g)
    torch.testing.assert_close(q4.bias.grad, g.sum((0, 1)), atol=1e-5, rtol=0)


def _saved_sizes(fn):
    saved = []

    def pack(t):
        saved.append((t.numel(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_no_full_precision_weight_saved_for_backward():
    torch.manual_seed(3)
    q4 = Linear4bit.from_linear(nn.Linear(128, 256))
    x = torch.randn(4, 128, requires_grad=True)
    naive = _saved_sizes(lambda: nn.functional.linear(x, dequantize_nf4(q4.quantized)))
    assert (256 * 128, torch.float32) in naive  # de-quantize then F.linear: autograd keeps W (as W^T)
    ours = _saved_sizes(lambda: q4(x))
    assert not any(n >= 256 * 128 and dt.is_floating_point for n, dt in ours)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_tiny_llama_qlora_end_to_end():
    model = quantize_model(_tiny_llama())
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit))}
    assert kinds["lm_head"] is nn.Linear
    assert sum(k is Linear4bit for k in kinds.values()) == 2 * 7  # q k v o gate up down per layer
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        logits = model(ids).logits
        plain = dequantize_model(copy.deepcopy(model))
        assert not any(isinstance(m, Linear4bit) for m in plain.modules())
        torch.testing.assert_close(plain(ids).logits, logits, atol=1e-4, rtol=0)

    peftlab.inject(model, peftlab.LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
        assert all(b.grad is None for b in model.buffers())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()

    with torch.no_grad():
        adapted = model(ids).logits
        merged = dequantize_model(copy.deepcopy(model))  # de-quantized copy: merging is exact there
        peftlab.merge(merged)
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-4, rtol=0)

        with pytest.raises(RuntimeError, match="4-bit"):
            peftlab.merge(model)  # refused on the 4-bit model itself
        assert not any(getattr(m, "merged", None) for m in model.modules())
        torch.testing.assert_close(model(ids).logits, adapted, atol=0, rtol=0)  # unchanged


def test_refuses_width_not_a_multiple_of_block_size():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(10, 3))  # 30 elements
    with pytest.raises(ValueError, match=r"'1'.*\(3, 10\).*30 elements.*block_size=64.*use block_size=2"):
        quantize_model(model)
    assert all(type(m) is nn.Linear for m in model)  # checked before anything changed
    quantize_model(model, skip=("1",))
    assert type(model[0]) is Linear4bit and type(model[1]) is nn.Linear


@pytest.mark.parametrize("bad", [0, -64, 63, True, 64.0])
def test_refuses_bad_block_size(bad):
    with pytest.raises(ValueError, match=f"block_size must be a positive even int.*got {bad!r}.*use 64"):
        quantize_nf4(torch.randn(4, 64), block_size=bad)


def test_refuses_non_float_and_non_finite_weights():
    with pytest.raises(ValueError, match="floating-point.*torch.int64.*weight.float"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.int64))
    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"\(4, 64\).*NaN"):
        quantize_nf4(w)
    with pytest.raises(ValueError, match="tuple of module names"):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), skip="lm_head")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_computes_in_the_input_dtype(device):
    torch.manual_seed(5)
    q4 = Linear4bit.from_linear(nn.Linear(64, 32)).to(device)
    x = torch.randn(2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    y = q4(x)
    assert y.dtype == torch.bfloat16 and y.device.type == device
    want = q4.to_linear().to(torch.bfloat16)(x.detach())
    torch.testing.assert_close(y, want, atol=2e-2, rtol=2e-2)
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape


def test_merge_and_unload_refuse_a_partly_4bit_model_before_changing_any_layer():
    import peftlab
    from peftlab import quant

    model = _tiny_llama_for_merge()
    quant.quantize_model(model, skip=("v_proj",))  # q_proj 4-bit, v_proj full precision
    peftlab.inject(model, peftlab.LoRAConfig(r=4, target_modules=("q_proj", "v_proj")))
    for module in model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (peftlab.merge, peftlab.unload):
        with pytest.raises(RuntimeError, match="de-quantized copy"):
            call(model)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert not any(getattr(m, "merged", None) for m in model.modules())


def _tiny_llama_for_merge():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_load_model_refuses_an_unknown_quantization_before_loading_anything():
    with pytest.raises(ValueError, match=r"quantize='int4'.*\"nf4\""):
        peftlab.load_model("minilm", quantize="int4")
