"""Tiny random models and checks shared by the LoRA test files (not a test module)."""

from __future__ import annotations

import copy
import os

import torch
import transformers as T

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 97

# kind -> (factory, LoRA targets for the attention q/v projections)
ARCHS = {
    "bert": (lambda: T.BertForSequenceClassification(T.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
        ("query", "value")),
    "roberta": (lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
        ("query", "value")),
    "distilbert": (lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
        dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=VOCAB, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)), ("q_lin", "v_lin")),
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)), ("c_attn",)),
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)),
        ("q_proj", "v_proj")),
}


def tiny(kind: str = "bert", seed: int = 0) -> torch.nn.Module:
    """A freshly initialised tiny model in eval mode (deterministic given ``seed``)."""
    torch.manual_seed(seed)
    return ARCHS[kind][0]().eval()


def targets(kind: str) -> tuple[str, ...]:
    return ARCHS[kind][1]


def ids(batch: int = 2, seq: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=g)


def out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def randomize_lora_b(model: torch.nn.Module, seed: int = 3, scale: float = 0.5, name: str = "") -> None:
    """Give every lora_B (of adapter ``name`` if given) a random value so the adapter changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and f"lora_B.{name}" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def snapshot(model: torch.nn.Module) -> tuple[dict, list, dict]:
    """Everything a failed call must leave untouched: tensors, module types, trainable flags."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return sd, types, {"grads": grads, "registry": dict(getattr(model, "peftlab_configs", {}))}


def assert_unchanged(model: torch.nn.Module, before: tuple) -> None:
    sd, types, extra = snapshot(model)
    assert types == before[1]
    assert sd.keys() == before[0].keys()
    for k in sd:
        assert torch.equal(sd[k], before[0][k]), k
    assert extra == before[2]


def clone(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)
