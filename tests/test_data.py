from collections import Counter

import pytest
import torch

from peftlab import data


@pytest.fixture(scope="module")
def rotten():
    return data.load_sentiment("rotten_tomatoes", seed=0)


def test_sentiment_splits_are_disjoint_stratified_and_labelled(rotten):
    assert set(rotten) == {"train", "validation", "test"}
    sizes = {k: len(v) for k, v in rotten.items()}
    total = sum(sizes.values())
    assert 8400 <= total <= 8530  # 8,530 sentences less exact duplicates
    assert abs(sizes["test"] / total - 0.1) < 0.005
    assert rotten["train"].features["label"].names == ["neg", "pos"]
    texts = [set(rotten[k]["text"]) for k in rotten]
    assert not texts[0] & texts[1] and not texts[0] & texts[2] and not texts[1] & texts[2]
    for split in rotten.values():
        counts = Counter(split["label"])
        assert abs(counts[0] - counts[1]) <= 1  # the source is balanced; stratification keeps it


def test_sentiment_split_depends_only_on_seed(rotten):
    again = data.load_sentiment("rotten_tomatoes", seed=0)
    other = data.load_sentiment("rotten_tomatoes", seed=1)
    assert list(again["test"]["text"]) == list(rotten["test"]["text"])
    assert list(other["test"]["text"]) != list(rotten["test"]["text"])


def test_imdb_sizes():
    imdb = data.load_sentiment("imdb")
    total = sum(len(v) for v in imdb.values())
    assert 24_800 <= total <= 25_000
    assert len(set(imdb["train"]["text"])) == len(imdb["train"])


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError, match="rotten_tomatoes"):
        data.load_sentiment("sst2")


def test_e2e_no_table_in_two_splits():
    e2e = data.load_e2e()
    tables = {k: set(v["table"]) for k, v in e2e.items()}
    assert not tables["train"] & tables["validation"]
    assert not tables["train"] & tables["test"]
    assert not tables["validation"] & tables["test"]
    assert len(e2e["train"]) + len(e2e["validation"]) == 4672  # every dev line kept
    assert len(tables["train"]) + len(tables["validation"]) == 547
    order, refs = data.group_references(e2e["test"])
    assert len(order) == len(tables["test"]) and sum(map(len, refs)) == len(e2e["test"])


def test_stratified_subset_keeps_balance(rotten):
    sub = data.stratified_subset(rotten["train"], 200, seed=3)
    assert len(sub) == 200
    assert Counter(sub["label"]) == {0: 100, 1: 100}


def test_tokenize_and_collate_pad_dynamically(minilm, rotten):
    _, tok = minilm
    part = rotten["validation"].select(range(8))
    enc = data.tokenize_classification(part, tok, max_length=32)
    assert len(enc) == 8 and max(len(x) for x in enc["input_ids"]) <= 32
    batch = data.PadCollator(tok)(list(enc))
    longest = max(len(x) for x in enc["input_ids"])
    assert batch["input_ids"].shape == (8, longest)
    assert torch.equal(batch["attention_mask"].sum(1),
                       torch.tensor([len(x) for x in enc["input_ids"]]))
    assert batch["labels"].tolist() == list(part["label"])
    left = data.PadCollator(tok, side="left")(list(enc))
    assert (left["attention_mask"][:, -1] == 1).all()


def test_tokenize_rejects_missing_column_and_empty(minilm, rotten):
    _, tok = minilm
    with pytest.raises(KeyError, match="label"):
        data.tokenize_classification(rotten["train"].remove_columns("label"), tok)
    with pytest.raises(ValueError, match="empty"):
        data.tokenize_classification(rotten["train"].select([]), tok)


def test_e2e_labels_mask_the_prompt(smollm2):
    _, tok = smollm2
    e2e = data.load_e2e()
    enc = data.tokenize_e2e(e2e["test"].select(range(2)), tok)
    ids, labels = enc[0]["input_ids"], enc[0]["labels"]
    prompt_len = len(tok(data.e2e_prompt(e2e["test"][0]["table"]), add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] and ids[-1] == tok.eos_token_id
    batch = data.PadCollator(tok)(list(enc))
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


# --- batching by length -------------------------------------------------------------------

def _padding_share(batches, lengths):
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - real / padded


def test_length_grouped_batches_cover_every_row_once_and_follow_the_seed():
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 65, (1003,), generator=rng).tolist()
    sampler = data.LengthGroupedBatches(lengths, 32, seed=5, group=4)
    first = sampler.batches()
    assert len(first) == len(sampler) == 32  # ceil(1003 / 32)
    assert sorted(i for b in first for i in b) == list(range(1003))
    assert all(len(b) <= 32 for b in first)
    assert first == data.LengthGroupedBatches(lengths, 32, seed=5, group=4).batches()  # seeded
    sampler.set_epoch(1)
    assert sampler.batches() != first  # a new order every epoch
    sampler.set_epoch(0)
    assert sampler.batches() == first  # ... reproducible per epoch (resume)
    assert data.LengthGroupedBatches(lengths, 32, seed=6, group=4).batches() != first


def test_length_grouping_removes_most_padding():
    rng = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 65, (3200,), generator=rng).tolist()
    grouped = data.LengthGroupedBatches(lengths, 32, seed=0).batches()
    perm = torch.randperm(3200, generator=rng).tolist()
    random_batches = [perm[i:i + 32] for i in range(0, 3200, 32)]
    # uniform lengths 3..64: a random batch of 32 is about 47 % padding
    assert _padding_share(random_batches, lengths) > 0.4
    assert _padding_share(grouped, lengths) < 0.05


def test_evaluation_order_is_longest_first_and_fixed():
    lengths = [5, 9, 2, 9, 7]
    batches = data.LengthGroupedBatches(lengths, 2, shuffle=False).batches()
    assert batches == [[1, 3], [4, 0], [2]]


def test_length_grouped_batches_reject_bad_input():
    with pytest.raises(ValueError, match="batch_size"):
        data.LengthGroupedBatches([3, 4], 0)
    with pytest.raises(ValueError, match="non-empty"):
        data.LengthGroupedBatches([], 4)
