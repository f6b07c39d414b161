"""Tiny models and data shared by the training, metrics, search and CLI tests (not a test module)."""

from __future__ import annotations

import os

import torch
import transformers as T
from datasets import Dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 100


def record_group_lrs(monkeypatch) -> list[list[float]]:
    """Make ``torch.optim.AdamW`` record every param group's lr at each step; returns the (growing) record."""
    seen: list[list[float]] = []

    class Spy(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append([g["lr"] for g in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    return seen


def tiny_bert(seed: int = 0, dropout: float = 0.0) -> T.BertForSequenceClassification:
    """A 2-layer, 32-wide BERT classifier (fresh weights from ``seed``)."""
    torch.manual_seed(seed)
    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                       hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                       num_labels=2, pad_token_id=0)
    return T.BertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0) -> T.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                        max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return T.LlamaForCausalLM(cfg).eval()


def toy_classification(n: int = 24, seed: int = 0) -> Dataset:
    """Tokenised rows of varying length; the label is whether token 7 occurs (learnable)."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for i in range(n):
        length = int(torch.randint(4, 12, (1,), generator=g))
        ids = torch.randint(8, VOCAB, (length,), generator=g).tolist()
        label = i % 2
        if label:
            ids[length // 2] = 7
        rows["input_ids"].append([1] + ids)
        rows["attention_mask"].append([1] * (length + 1))
        rows["labels"].append(label)
    return Dataset.from_dict(rows)


def freeze_all_but(model: torch.nn.Module, *keys: str) -> torch.nn.Module:
    for name, p in model.named_parameters():
        p.requires_grad = any(k in name for k in keys)
    return model


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
