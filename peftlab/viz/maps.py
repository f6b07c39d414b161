"""Getting a model's attention maps, and measuring them (notebook 08).

Explained in ``notebooks/08_attention_visualization.ipynb``, sections "Getting the maps",
"After fine-tuning" and "Where the prefix draws attention". ``attention_maps`` runs a model
once with ``output_attentions=True`` and returns an :class:`AttentionMaps`: the query tokens
and, per layer, a (heads, T, m + T) tensor. ``m`` is 0 for an ordinary model; a prefix-tuned
model (``peftlab.prefix``) attends to m virtual tokens first, named P0, P1, ... on the key axis.
``attention_change`` and ``prefix_share`` reduce maps to one number per layer and head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["NO_MAPS", "AttentionMaps", "aligned", "attention_change", "attention_maps", "clean_token",
           "encode_sentence", "prefix_names", "prefix_share"]

# transformers attention kernels that never materialise the probabilities
NO_MAPS = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "paged_attention")


# -- getting the maps ---------------------------------------------------------------------
def prefix_names(m: int) -> list[str]:
    """Labels of m prefix virtual tokens: ``["P0", "P1", ...]``."""
    return [f"P{i}" for i in range(m)]


@dataclass
class AttentionMaps:
    """One sentence's attention probabilities (section "Getting the maps").

    ``attentions[l]`` is (heads, T, m + T): row i is query token i's distribution over the
    m prefix keys (if any) followed by the T token keys; every row sums to 1.
    """

    tokens: list[str]
    attentions: list[torch.Tensor]
    truncated: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.attentions)

    @property
    def num_heads(self) -> int:
        return self.attentions[0].shape[0]

    @property
    def prefix_length(self) -> int:
        return self.attentions[0].shape[-1] - len(self.tokens)

    @property
    def key_tokens(self) -> list[str]:
        return prefix_names(self.prefix_length) + list(self.tokens)

    def check(self, layer: int, head: int | None = None) -> None:
        """Raise ``IndexError`` naming the valid range when ``layer`` or ``head`` is outside it."""
        for what, value, count in (("layer", layer, self.num_layers), ("head", head, self.num_heads)):
            if value is None and what == "head":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
                raise IndexError(f"{what} {value!r} is out of range: this model has {count} {what}s, "
                                 f"numbered 0 to {count - 1}")

    def head(self, layer: int, head: int) -> torch.Tensor:
        """The (T, m + T) map of one head."""
        self.check(layer, head)
        return self.attentions[layer][head]


def clean_token(token: str) -> str:
    """A token as a label: byte-level BPE and SentencePiece word markers become a space."""
    return token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\\n").strip() or token


def _no_maps(impl) -> RuntimeError:
    return RuntimeError(
        f"this model runs attention with {impl!r}, which returns no attention maps. Load it with "
        'peftlab.load_model(..., attn_implementation="eager") or switch it in place with '
        'model.set_attn_implementation("eager").')


def _length_limit(model, tokenizer, max_length: int | None) -> int:
    limits = [getattr(getattr(model, "config", None), "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None), max_length]
    return min(int(x) for x in limits if x is not None and 0 < x < 1_000_000)


def encode_sentence(model, tokenizer, sentence: str, max_length: int | None):
    """Tokenise one sentence, cutting it (and saying so) where the model's limit demands."""
    if not isinstance(sentence, str) or not sentence.strip():
        raise ValueError(f"sentence must be a non-empty string, got {sentence!r}")
    limit = _length_limit(model, tokenizer, max_length)
    n = len(tokenizer(sentence, verbose=False)["input_ids"])  # verbose=False: we say it ourselves
    if n > limit:
        print(f"peftlab.viz: the sentence is {n} tokens long but the model reads at most {limit}; "
              f"it was truncated to its first {limit} tokens.")
    batch = tokenizer(sentence, return_tensors="pt", truncation=True, max_length=limit)
    return batch, n > limit


def attention_maps(model, tokenizer, sentence: str, *, max_length: int | None = None) -> AttentionMaps:
    """Run ``model`` on ``sentence`` and return its attention maps (section "Getting the maps").

    Too long a sentence is truncated with a printed notice. A model whose attention kernel
    returns no maps (sdpa, flash) raises ``RuntimeError`` saying how to switch to eager.
    """
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl in NO_MAPS:
        raise _no_maps(impl)
    batch, truncated = encode_sentence(model, tokenizer, sentence, max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**{k: v.to(device) for k, v in batch.items()}, output_attentions=True)
    finally:
        model.train(was_training)
    found = getattr(out, "attentions", None)
    if not found or any(a is None for a in found):
        raise _no_maps(impl)
    tokens = [clean_token(t) for t in tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())]
    return AttentionMaps(tokens, [a[0].detach().float().cpu() for a in found], truncated)


# -- before / after ---------------------------------------------------------------------
def aligned(base: AttentionMaps, tuned: AttentionMaps) -> tuple[list[torch.Tensor], list[torch.Tensor], AttentionMaps]:
    """Both models' maps over the same keys: the one without a prefix gets zero prefix columns."""
    if base.tokens != tuned.tokens:
        raise ValueError("the two maps are for different token sequences; run both models on the same sentence")
    if (base.num_layers, base.num_heads) != (tuned.num_layers, tuned.num_heads):
        raise ValueError(f"the models differ in shape: {base.num_layers}x{base.num_heads} vs "
                         f"{tuned.num_layers}x{tuned.num_heads} (layers x heads)")
    m = max(base.prefix_length, tuned.prefix_length)

    def pad(maps):
        extra = m - maps.prefix_length
        return [torch.nn.functional.pad(a, (extra, 0)) for a in maps.attentions]

    return pad(base), pad(tuned), (base if base.prefix_length == m else tuned)


def attention_change(base: AttentionMaps, tuned: AttentionMaps) -> torch.Tensor:
    """(layers, heads): mean over queries of the total variation ½·Σ_k |a_k − b_k| (section "After fine-tuning").

    0 means a head attends exactly as before; 1 means every query moved all its attention.
    """
    a, b, _ = aligned(base, tuned)
    return torch.stack([0.5 * (y - x).abs().sum(-1).mean(-1) for x, y in zip(a, b)])


def prefix_share(maps: AttentionMaps, *, per_query: bool = False) -> torch.Tensor:
    """λ, the attention mass on the prefix keys (section "Where the prefix draws attention").

    For query i, λ_i = Σ_{j<m} a_ij. Averaged over queries: (layers, heads); with
    ``per_query=True``: (layers, heads, T).
    """
    m = maps.prefix_length
    if m == 0:
        raise ValueError("these maps have no prefix columns (as many keys as queries): prefix share "
                         "needs a prefix-tuned model (peftlab.PrefixConfig)")
    lam = torch.stack([a[:, :, :m].sum(-1) for a in maps.attentions])  # (L, H, T)
    return lam if per_query else lam.mean(-1)
