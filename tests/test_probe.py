"""peftlab.probe: frozen-feature baselines, against hand computations on a tiny BERT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peftlab.probe import linear_probe, pooled_features
from train_helpers import tiny_bert, toy_classification


def test_mean_pooling_averages_real_tokens_only_and_keeps_row_order():
    model, data = tiny_bert(), toy_classification(20)
    feats, labels = pooled_features(model, data, "mean", batch_size=6)  # length-sorted batches inside
    assert feats.shape == (20, 32) and labels.tolist() == list(data["labels"])
    for i in (0, 7, 19):  # one row at a time, no padding: the plain mean over its tokens
        ids = torch.tensor([data[i]["input_ids"]])
        with torch.no_grad():
            hidden = model.bert(input_ids=ids).last_hidden_state[0]  # (T, d)
        np.testing.assert_allclose(feats[i], hidden.mean(0).numpy(), atol=1e-5)


def test_cls_and_pooler_features_are_what_the_head_sees():
    model, data = tiny_bert(), toy_classification(8)
    cls, _ = pooled_features(model, data, "cls")
    pooled, _ = pooled_features(model, data, "pooler")
    ids = torch.tensor([data[3]["input_ids"]])
    with torch.no_grad():
        out = model.bert(input_ids=ids)
    np.testing.assert_allclose(cls[3], out.last_hidden_state[0, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(pooled[3], out.pooler_output[0].numpy(), atol=1e-5)
    both = pooled_features(model, data, ("cls", "pooler"), batch_size=3)  # one pass, several poolings
    assert set(both) == {"cls", "pooler"}
    np.testing.assert_allclose(both["cls"][0], cls, atol=1e-6)
    np.testing.assert_allclose(both["pooler"][0], pooled, atol=1e-6)
    with pytest.raises(ValueError, match="pooling must be one of"):
        pooled_features(model, data, ("mean", "max"))


def test_linear_probe_separates_separable_features_and_rejects_bad_input():
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    x = rng.normal(size=(200, 5)) + 3.0 * y[:, None]  # two well-separated clouds
    res = linear_probe(x[:150], y[:150], x[150:], y[150:])
    assert res["accuracy"] > 0.95 and res["C"] in (0.01, 0.1, 1.0, 10.0)
    shuffled = linear_probe(x[:150], rng.permutation(y[:150]), x[150:], y[150:])
    assert shuffled["accuracy"] < 0.8  # labels unrelated to the features: no better than a coin, roughly
    with pytest.raises(ValueError, match="differ in length"):
        linear_probe(x[:10], y[:9], x[:5], y[:5])
    with pytest.raises(ValueError, match="pooling"):
        pooled_features(tiny_bert(), toy_classification(4), "max")
