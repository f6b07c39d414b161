import os
import random

import numpy as np
import pytest
import torch

from peftlab import runtime


def test_seed_everything_repeats_all_generators():
    runtime.seed_everything(123)
    first = (random.random(), np.random.rand(), torch.rand(3))
    runtime.seed_everything(123)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2])


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_seed_everything_rejects_bad_seed(bad):
    with pytest.raises(ValueError, match="seed"):
        runtime.seed_everything(bad)


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("true", True), ("0", False),
                                               ("", False), ("off", False)])
def test_quick_mode_reads_env(monkeypatch, raw, expected):
    monkeypatch.setenv("PEFTLAB_QUICK", raw)
    assert runtime.quick_mode() is expected


def test_quick_mode_rejects_garbage(monkeypatch):
    monkeypatch.setenv("PEFTLAB_QUICK", "maybe")
    with pytest.raises(ValueError, match="maybe"):
        runtime.quick_mode()


def test_sentinel_fails_when_quick_mode_is_lost(monkeypatch):
    monkeypatch.setenv("PEFTLAB_EXPECT_QUICK", "1")
    monkeypatch.setenv("PEFTLAB_QUICK", "0")
    with pytest.raises(RuntimeError, match="PEFTLAB_QUICK"):
        runtime.assert_quick_reached()
    monkeypatch.setenv("PEFTLAB_QUICK", "1")
    assert runtime.assert_quick_reached() is True


def test_quick_mode_reaches_this_test_run():
    """`make test` exports both variables; a run that lost them is not the CI run."""
    if os.environ.get("PEFTLAB_EXPECT_QUICK"):
        assert runtime.quick_mode()


def test_device_order_and_override(monkeypatch):
    monkeypatch.delenv("PEFTLAB_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else None
    device = runtime.get_device()
    if expected:
        assert device.type == expected
    else:
        assert device.type in ("cpu", "mps")
    assert runtime.get_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            runtime.get_device("cuda")


def test_autocast_dtype():
    assert runtime.autocast_dtype("cpu") is None
    if torch.cuda.is_available():
        assert runtime.autocast_dtype("cuda") in (torch.bfloat16, torch.float16)
