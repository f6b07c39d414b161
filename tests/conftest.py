"""Shared fixtures: the real embedded models, loaded once per test session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm():
    """Real all-MiniLM-L6-v2 with a fresh 2-way head (seeded), and its tokenizer."""
    from peftlab import load_model

    return load_model("minilm", task="classification", num_labels=2)


@pytest.fixture(scope="session")
def smollm2():
    """Real SmolLM2-135M-Instruct as a causal LM (fp32, converted once into the cache)."""
    from peftlab import load_model

    return load_model("smollm2", task="causal-lm")
