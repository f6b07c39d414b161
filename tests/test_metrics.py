"""peftlab.metrics against hand-computed references."""

from __future__ import annotations

import math
import time

import pytest
import torch
from datasets import Dataset

from peftlab import metrics as M
from train_helpers import tiny_bert, tiny_llama, toy_classification


def test_accuracy_and_f1_by_hand():
    y = [1, 1, 1, 0, 0, 0, 1, 0]
    p = [1, 0, 1, 0, 1, 0, 1, 0]  # TP = 3, FN = 1, FP = 1, TN = 3
    assert M.accuracy(y, p) == 6 / 8
    precision, recall = 3 / 4, 3 / 4
    assert M.f1(y, p) == pytest.approx(2 * precision * recall / (precision + recall))
    assert M.f1([0, 1, 2], [0, 1, 1]) == pytest.approx((1 + 2 / 3 + 0) / 3)  # macro over 3 classes
    with pytest.raises(ValueError, match="shape"):
        M.accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="no labels"):
        M.accuracy([], [])


def test_roc_auc_is_the_share_of_correctly_ordered_pairs():
    y = [0, 0, 1, 1]
    s = [0.1, 0.6, 0.4, 0.9]  # pairs (neg, pos): (0.1,0.4) ok (0.1,0.9) ok (0.6,0.4) no (0.6,0.9) ok
    assert M.roc_auc(y, s) == pytest.approx(3 / 4)
    assert math.isnan(M.roc_auc([1, 1], [0.2, 0.3]))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    out = M.classification_metrics([0, 1, 1, 1], logits)
    assert out["accuracy"] == 0.75 and out["roc_auc"] == pytest.approx(1.0)


def test_bleu_identical_is_100_and_multiple_references_help():
    hyps = ["the restaurant serves cheap food", "it is near the river"]
    assert M.bleu(hyps, [[h] for h in hyps]) == pytest.approx(100.0)
    one = M.bleu(["the cafe is near the river bank"], [["the pub lies close to the river bank"]])
    two = M.bleu(["the cafe is near the river bank"],
                 [["the pub lies close to the river bank", "the cafe is near the river"]])
    assert 0 < one < two < 100
    ragged = M.bleu(hyps, [[hyps[0], "something else"], [hyps[1]]])  # rows of different length
    assert ragged == pytest.approx(100.0)
    with pytest.raises(ValueError, match="reference lists"):
        M.bleu(hyps, [["x"]])


def test_rouge_l_from_the_longest_common_subsequence():
    hyp, ref = "the cat sat on the mat", "the cat was on the mat"
    # LCS = "the cat on the mat" (5 tokens); P = R = 5/6 so F = 5/6
    assert M.rouge_l([hyp], [[ref]]) == pytest.approx(5 / 6)
    assert M.rouge_l([hyp], [["a dog", hyp]]) == pytest.approx(1.0)  # best reference counts


def test_perplexity_is_exp_of_mean_token_nll():
    assert M.perplexity([math.log(2), math.log(8)]) == pytest.approx(4.0)
    model = tiny_llama()
    ids = [[1, 5, 9, 13, 17], [1, 6, 10]]
    labels = [[-100, 5, 9, 13, 17], [-100, 6, 10]]  # the first token is a prompt
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids],
                            "labels": labels})
    nll = []
    with torch.no_grad():
        for row in ids:
            logp = model(input_ids=torch.tensor([row])).logits[0].log_softmax(-1)
            nll += [-float(logp[t, row[t + 1]]) for t in range(len(row) - 1)]
    got = M.evaluate(model, ds, batch_size=2)
    assert got["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    with pytest.raises(ValueError, match="language-modelling"):
        M.evaluate_classifier(model, ds)


def test_evaluate_classifier_matches_a_manual_loop():
    model, data = tiny_bert(), toy_classification(10)
    got = M.evaluate_classifier(model, data, batch_size=3)
    with torch.no_grad():
        preds = [int(model(input_ids=torch.tensor([r])).logits.argmax()) for r in data["input_ids"]]
    assert got["accuracy"] == pytest.approx(M.accuracy(list(data["labels"]), preds))
    with pytest.raises(ValueError, match="empty"):
        M.evaluate_classifier(model, data.select([]))


def test_latency_is_a_median_after_warmup():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002 if len(calls) > 2 else 0.05)  # slow warm-up calls are not timed

    t = M.latency(fn, repeats=5, warmup=2)
    assert len(calls) == 7 and 0.0015 < t < 0.03
    with pytest.raises(ValueError):
        M.latency(fn, repeats=0)


def test_peak_memory_sees_a_temporary_allocation():
    """In a fresh process: a long-lived one may reuse freed pages, so RSS need not grow."""
    import subprocess
    import sys

    script = (
        "import time, torch\n"
        "from peftlab import metrics as M\n"
        "with M.PeakMemory('cpu', interval=0.001) as mem:\n"
        "    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched\n"
        "    time.sleep(0.05)\n"
        "    del block\n"
        "assert mem.extra > 48 * 2**20, mem.extra\n"
        "assert M.peak_rss_bytes() >= mem.peak * 0.9\n"
        "print('PEAK-OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "PEAK-OK" in proc.stdout, proc.stderr[-2000:]
