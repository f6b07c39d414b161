"""Virtual tokens that start as real ones: the token ids prefix and prompt tuning begin from.

Li & Liang 2021 (prefix-tuning) found prefixes initialised from real words' activations
better than random ones, and Lester et al. 2021 (prompt tuning) initialise prompts from
vocabulary embeddings. ``init_ids`` picks those words for both methods: a phrase read with the
model's own tokenizer, or seeded samples from its vocabulary. Explained in
notebooks/04_prefix_tuning.ipynb.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DEFAULT_PHRASE", "init_ids", "vocab_ids", "VOCAB_SEED", "SKIP_IDS"]

DEFAULT_PHRASE = ("The following text is written in plain English and can be read by anyone who is "
                  "interested in it.")  # init="auto": neutral, task-free; ~20 tokens, so m = 16 needs no repeat
VOCAB_SEED = 0  # init="vocab": the token ids are drawn from their own generator (the global RNG is untouched)
SKIP_IDS = 1000  # init="vocab" skips ids below min(SKIP_IDS, vocab // 10): BERT's [PAD]/[unusedN]/[CLS]..., byte tokens


def _load_tokenizer(model: nn.Module, config, required: bool):
    """(tokenizer, source) for ``config.tokenizer`` or the model's own; None when not ``required`` and none loads."""
    from transformers import AutoTokenizer

    source = config.tokenizer or getattr(model.config, "_name_or_path", None)
    if not source:
        if required:
            raise ValueError(f'init={config.init!r} needs a tokenizer: set tokenizer="<name or folder>" in the config')
        return None
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(source), source
    except Exception as err:  # a missing folder, no network, a folder without tokenizer files, ...
        if required:
            raise ValueError(f"could not load the tokenizer {source!r} for init={config.init!r} ({err}): "
                             'set tokenizer="<name or folder>" in the config') from err
        return None
    finally:
        transformers.logging.set_verbosity(level)


def _words_ids(tok, words: str, vocab: int, m: int) -> torch.Tensor | None:
    """Token ids (m,) of ``words`` (no special tokens), repeated or cut to m; None if they do not fit ``vocab``."""
    ids = tok(words, add_special_tokens=False)["input_ids"]
    if not ids or max(ids) >= vocab:
        return None
    reps = -(-m // len(ids))
    return torch.tensor((ids * reps)[:m], dtype=torch.long)  # (m,)


def vocab_ids(model: nn.Module, m: int, seed: int = VOCAB_SEED) -> torch.Tensor:
    """m token ids (m,) sampled without replacement (seeded) from the model's vocabulary.

    Skips the first min(SKIP_IDS, vocab // 10) ids (special, unused and byte tokens in BERT and
    Llama vocabularies) and the special ids the model config names (bos, eos, pad, ...).
    """
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    rows = model.get_input_embeddings().num_embeddings
    hi = min(rows, getattr(cfg, "vocab_size", None) or rows)
    special = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "cls_token_id", "unk_token_id",
                "mask_token_id", "decoder_start_token_id"):
        value = getattr(cfg, key, None)
        special.update(value if isinstance(value, (list, tuple)) else [value])
    pool = torch.tensor([i for i in range(min(SKIP_IDS, hi // 10), hi) if i not in special], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    pick = (torch.randperm(len(pool), generator=gen)[:m] if len(pool) >= m
            else torch.randint(len(pool), (m,), generator=gen))
    return pool[pick]  # (m,)


def init_ids(model: nn.Module, config, m: int) -> torch.Tensor:
    """The real token ids (m,) whose keys/values (prefix) or embeddings (prompt) start an adapter.

    ``config.init``: "text:<words>" (tokenizer required), "auto" (``DEFAULT_PHRASE`` with the
    model's tokenizer, else ``vocab_ids``) or "vocab" (``vocab_ids``). Not for "random".
    """
    vocab = model.get_input_embeddings().num_embeddings
    if config.init == "vocab":
        return vocab_ids(model, m)
    if config.init == "auto":
        found = _load_tokenizer(model, config, required=False)
        ids = _words_ids(found[0], DEFAULT_PHRASE, vocab, m) if found is not None else None
        return vocab_ids(model, m) if ids is None else ids
    if not config.init.startswith("text:"):
        raise ValueError(f"init={config.init!r} takes no token ids")
    tok, source = _load_tokenizer(model, config, required=True)
    ids = _words_ids(tok, config.init[5:].strip(), vocab, m)
    if ids is None:
        raise ValueError(f"the tokenizer {source!r} does not fit this model's vocabulary ({vocab} tokens)")
    return ids


