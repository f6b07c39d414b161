"""Frozen-feature baselines: what a linear classifier on a pretrained model's features reaches.

A fine-tuning method is only worth its cost if it beats the cheapest honest baseline: freeze
the whole body, compute one feature vector per sentence once, and fit a linear classifier on
top. How the vector is pooled matters. all-MiniLM-L6-v2 was trained (as a sentence-transformers
model) so that the **mean of its token vectors** is the sentence embedding; its [CLS] vector
and BERT's pooler were never trained for that, so a probe on them underrates the frozen model
and flatters every method compared with it.

``pooled_features(model, data, pooling="mean"|"cls"|"pooler")`` computes the features in
length-sorted batches under ``torch.inference_mode``; ``linear_probe`` fits an L2-regularised
logistic regression (scikit-learn, the regularisation strength picked on a held-out part of
the training features) and scores it. Explained in ``notebooks/03_lora.ipynb``, section
"The baselines".
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["POOLINGS", "pooled_features", "linear_probe"]

POOLINGS = ("mean", "cls", "pooler")


def _encoder(model):
    """The bare encoder inside a sequence classifier (BERT-style ``model.bert`` etc.), or the model."""
    prefix = getattr(model, "base_model_prefix", None)
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, torch.nn.Module) else model


@torch.inference_mode()
def pooled_features(model, data, pooling: str | tuple[str, ...] = "mean", batch_size: int = 128):
    """Features (N, d) and labels (N,) of a tokenised dataset, in the dataset's row order.

    ``mean``: average of the last layer's token vectors over the real (unpadded) tokens;
    ``cls``: the last layer's first-token vector; ``pooler``: BERT's pooler output
    (tanh(W h_cls + b)), what ``BertForSequenceClassification`` feeds its head.
    A tuple of poolings, e.g. ``("pooler", "mean")``, computes all of them in one pass over the
    data and returns ``{pooling: (features, labels)}``.
    """
    from peftlab.metrics import as_loader

    wanted = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    bad = [p for p in wanted if p not in POOLINGS]
    if bad or not wanted:
        raise ValueError(f"pooling must be one of {POOLINGS} (or a tuple of them), got {pooling!r}")
    encoder = _encoder(model)
    if "pooler" in wanted and getattr(encoder, "pooler", None) is None:
        raise ValueError(f"{type(encoder).__name__} has no pooler: use pooling='mean' or 'cls'")
    pad = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    loader = as_loader(data, batch_size, pad_token_id=pad)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats: dict[str, list[torch.Tensor]] = {p: [] for p in wanted}
    labels, order = [], []
    try:
        for idx, batch in zip(loader.batch_sampler, loader):
            mask = batch["attention_mask"].to(device)  # (B, T)
            out = encoder(input_ids=batch["input_ids"].to(device), attention_mask=mask)
            hidden = out.last_hidden_state  # (B, T, d)
            for p in wanted:
                if p == "mean":
                    w = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                    vec = (hidden * w).sum(1) / w.sum(1).clamp(min=1)  # (B, d)
                elif p == "cls":
                    vec = hidden[:, 0]  # (B, d)
                else:
                    vec = out.pooler_output  # (B, d)
                feats[p].append(vec.float().cpu())
            labels.append(batch["labels"])
            order += list(idx)
    finally:
        model.train(was_training)
    inverse = np.argsort(np.asarray(order))  # back to the dataset's row order
    y = torch.cat(labels).numpy()[inverse]
    found = {p: (torch.cat(v).numpy()[inverse], y) for p, v in feats.items()}
    return found[pooling] if isinstance(pooling, str) else found


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 seed: int = 0, strengths=(0.01, 0.1, 1.0, 10.0)) -> dict[str, float]:
    """Fit logistic regression on frozen features; return test accuracy, F1 and the chosen C.

    C (inverse L2 strength) is chosen on a stratified 10 % of the training features, then the
    probe is refitted on all of them. Features are standardised with the training statistics.
    The default grid stops at C = 10: weaker regularisation costs lbfgs hundreds of iterations on
    MiniLM's pooler features and did not raise validation accuracy (notebook 03).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from peftlab.metrics import accuracy, f1

    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"features and labels differ in length: train {len(train_x)} vs {len(train_y)}, "
                         f"test {len(test_x)} vs {len(test_y)}")

    def fit(x, y, c):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x, y)

    fit_x, val_x, fit_y, val_y = train_test_split(train_x, train_y, test_size=0.1, stratify=train_y,
                                                  random_state=seed)
    scores = {c: accuracy(val_y, fit(fit_x, fit_y, c).predict(val_x)) for c in strengths}
    best = max(scores, key=scores.get)
    pred = fit(train_x, train_y, best).predict(test_x)
    return {"accuracy": accuracy(test_y, pred), "f1": f1(test_y, pred), "C": float(best)}
