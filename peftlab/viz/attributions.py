"""Which tokens pushed a classifier's decision: integrated gradients with Captum (notebook 08).

Layer integrated gradients (Sundararajan et al. 2017) on the input embeddings, as an
:class:`Attributions` record, coloured HTML and a bar plot. Explained in
``notebooks/08_attention_visualization.ipynb``, section "Attributions next to attention".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftlab.viz.heatmaps import FONT_SIZE, TITLE_SIZE, new_figure
from peftlab.viz.maps import clean_token, encode_sentence

__all__ = ["Attributions", "attribution_html", "plot_attributions", "token_attributions"]


@dataclass
class Attributions:
    """Integrated-gradients attribution of a classifier's logit to each token (section "Attributions").

    ``scores.sum() + delta == logit - baseline_logit`` (completeness).
    """

    tokens: list[str]
    scores: torch.Tensor  # (T,)
    target: int
    probability: float
    logit: float
    baseline_logit: float
    delta: float


def token_attributions(model, tokenizer, sentence: str, *, target: int | None = None, n_steps: int = 50,
                       max_length: int | None = None, internal_batch_size: int | None = None) -> Attributions:
    """Layer integrated gradients on the input embeddings, summed over the embedding width.

    Baseline: the same sentence with every non-special token replaced by padding. ``target``
    defaults to the predicted class. Explained in section "Attributions next to attention".
    """
    from captum.attr import LayerIntegratedGradients

    batch, _ = encode_sentence(model, tokenizer, sentence, max_length)
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    special = torch.tensor(tokenizer.get_special_tokens_mask(ids[0].tolist(), already_has_special_tokens=True),
                           dtype=torch.bool, device=device)
    baseline = torch.where(special, ids, torch.full_like(ids, tokenizer.pad_token_id))

    def logits(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out, base = logits(ids, mask), logits(baseline, mask)
        if out.dim() != 2:
            raise ValueError(f"token_attributions explains a sequence classifier (logits of shape (batch, "
                             f"classes)); this model returns logits of shape {tuple(out.shape)}")
        target = int(out.argmax(-1)) if target is None else target
        if not 0 <= target < out.shape[-1]:
            raise IndexError(f"target {target} is out of range: classes are 0 to {out.shape[-1] - 1}")
        lig = LayerIntegratedGradients(logits, model.get_input_embeddings())
        attr, delta = lig.attribute(ids, baselines=baseline, additional_forward_args=(mask,), target=target,
                                    n_steps=n_steps, internal_batch_size=internal_batch_size,
                                    return_convergence_delta=True)
    finally:
        model.train(was_training)
    tokens = [clean_token(t) for t in tokenizer.convert_ids_to_tokens(ids[0].tolist())]
    return Attributions(tokens, attr.sum(-1)[0].detach().float().cpu(), target,
                        float(out.softmax(-1)[0, target]), float(out[0, target]), float(base[0, target]),
                        float(delta))


def attribution_html(attr: Attributions) -> str:
    """Tokens on coloured backgrounds: green pushes towards the target class, red away."""
    import html

    top = max(float(attr.scores.abs().max()), 1e-12)
    spans = []
    for token, score in zip(attr.tokens, attr.scores.tolist()):
        rgb = "0,150,60" if score >= 0 else "210,40,40"
        spans.append(f'<span title="{score:+.3f}" style="background:rgba({rgb},{abs(score) / top:.2f});'
                     f'padding:1px 3px;margin:1px;border-radius:3px">{html.escape(token)}</span>')
    return (f'<div style="line-height:1.9">{" ".join(spans)}<br><small>class {attr.target}, '
            f"p = {attr.probability:.2f}; green: evidence for it, red: against</small></div>")


def plot_attributions(attr: Attributions, *, ax=None):
    """Bar plot of the per-token attributions (section "Attributions next to attention")."""
    if ax is None:
        ax = new_figure(1.5 + 0.4 * len(attr.tokens), 3).add_subplot()
    scores = attr.scores.numpy()
    ax.bar(range(len(scores)), scores, color=["tab:green" if s >= 0 else "tab:red" for s in scores])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(scores)), attr.tokens, rotation=90, fontsize=FONT_SIZE + 1)
    ax.tick_params(axis="y", labelsize=FONT_SIZE)
    ax.set_ylabel("attribution to the logit", fontsize=FONT_SIZE + 1)
    ax.set_title(f"integrated gradients, class {attr.target} (p = {attr.probability:.2f})", fontsize=TITLE_SIZE)
    return ax.figure
