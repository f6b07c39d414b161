"""peftlab.forgetting on a tiny random BERT and two synthetic tasks (token 5 present? token 7 present?)."""

import copy
import os

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, BertModel

from peftlab.adapters import AdapterConfig
from peftlab.config import LoRAConfig
from peftlab.forgetting import Forgetting, full_fine_tuning, with_adapters
from peftlab.inject import configs, disabled
from peftlab.metrics import evaluate_classifier
from peftlab.registry import active_adapter
from peftlab.train import TrainConfig, train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB, LENGTH = 40, 10
RECIPE = TrainConfig(lr=1e-2, batch_size=8, max_steps=6, warmup=0, seed=0, progress=False)
LORA = LoRAConfig(r=2, alpha=4, modules_to_save=("classifier",))
HOULSBY = AdapterConfig(bottleneck=4, placement="houlsby", modules_to_save=("classifier",))


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=2, pad_token_id=0)
    return BertForSequenceClassification(cfg).eval()


def task(token: int, n: int = 32, seed: int = 0) -> Dataset:
    """Rows of LENGTH random tokens; label 1 (every other row) when ``token`` is among them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (n, LENGTH), generator=g)  # (n, LENGTH), never 5 or 7
    labels = torch.arange(n) % 2
    ids[labels == 1, LENGTH // 2] = token
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * LENGTH] * n,
                              "labels": labels.tolist()})


TASK_A, TASK_B = task(5), task(7)
EVAL_A, EVAL_B = task(5, 16, seed=1), task(7, 16, seed=1)
PROBE = {"input_ids": torch.tensor(EVAL_A["input_ids"][:4]), "attention_mask": torch.ones(4, LENGTH, dtype=torch.long)}


def accuracy(model, data) -> float:
    return evaluate_classifier(model, data)["accuracy"]


def test_forgetting_is_the_drop_on_a():
    r = Forgetting(a_before=0.75, b=0.9, a_after=0.5)
    assert r.forgetting == 0.75 - 0.5


@pytest.mark.parametrize("config_b", [LORA, HOULSBY], ids=["lora-lora", "lora-houlsby"])
def test_adapters_leave_task_a_and_the_base_exactly_as_they_were(config_b):
    model = tiny_bert()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}  # the base model's own tensors
    params = dict(model.named_parameters())  # the same Parameter objects stay inside the wrappers
    with torch.no_grad():
        base_logits = model(**PROBE).logits

    r = with_adapters(model, LORA, config_b, TASK_A, TASK_B, EVAL_A, EVAL_B, RECIPE, names=("a", "b"), probe=PROBE)

    assert r.a_after == r.a_before and r.forgetting == 0
    assert torch.equal(r.probe_before, r.probe_after) and r.probe_before.shape == (4, 2)
    assert all(torch.equal(params[n], base[n]) for n in base)  # every base weight bit-identical
    with disabled(model), torch.no_grad():
        assert torch.equal(model(**PROBE).logits, base_logits)
    assert list(configs(model)) == ["a", "b"] and active_adapter(model) == "a"
    assert r.a_after == accuracy(model, EVAL_A)  # A active at the end
    assert not torch.equal(r.probe_after, base_logits)  # A's adapter (and head) did train


def test_adapters_refuse_one_name_twice_before_training():
    model = tiny_bert()
    with pytest.raises(ValueError, match="different names"):
        with_adapters(model, LORA, LORA, TASK_A, TASK_B, EVAL_A, EVAL_B, RECIPE, names=("x", "x"))
    assert configs(model) == {}


def test_full_fine_tuning_matches_the_experiment_done_by_hand():
    model, by_hand = tiny_bert(), tiny_bert()
    original_head = model.classifier
    encoder = {n: p.detach().clone() for n, p in model.bert.named_parameters()}
    r = full_fine_tuning(model, TASK_A, TASK_B, EVAL_A, EVAL_B, RECIPE, seed=3, probe=PROBE)

    # the same experiment written out (as notebook 09 used to)
    train(by_hand, TASK_A, None, RECIPE)
    a_before = accuracy(by_hand, EVAL_A)
    head_a = copy.deepcopy(by_hand.classifier)
    torch.manual_seed(3)
    by_hand.classifier.reset_parameters()
    train(by_hand, TASK_B, None, RECIPE)
    b = accuracy(by_hand, EVAL_B)
    by_hand.classifier = head_a
    assert (r.a_before, r.b, r.a_after) == (a_before, b, accuracy(by_hand, EVAL_A))

    assert model.classifier is original_head  # A's own head object is back ...
    assert torch.equal(model.classifier.weight, head_a.weight)  # ... with A's trained weights
    assert r.a_after == accuracy(model, EVAL_A)
    assert r.forgetting == r.a_before - r.a_after
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), by_hand.parameters()))
    changed = [n for n, p in model.bert.named_parameters() if not torch.equal(p, encoder[n])]
    assert any(n.startswith("encoder.") for n in changed)  # B rewrote the shared encoder
    with torch.no_grad():
        assert torch.equal(r.probe_after, model(**PROBE).logits)
    assert not torch.equal(r.probe_before, r.probe_after)


def test_full_fine_tuning_needs_a_head():
    model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=24, max_position_embeddings=16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="no classification head named 'classifier' or 'score'"):
        full_fine_tuning(model, TASK_A, TASK_B, EVAL_A, EVAL_B, RECIPE)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_full_fine_tuning_refuses_a_model_with_adapters():
    model = tiny_bert()
    with_adapters(model, LORA, LORA, TASK_A, TASK_B, EVAL_A, EVAL_B, RECIPE)
    with pytest.raises(ValueError, match="carries adapters"):
        full_fine_tuning(model, TASK_A, TASK_B, EVAL_A, EVAL_B, RECIPE)
