"""peftlab.lowrank against hand-computed values and float64 references (no model downloads)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from peftlab import lowrank


def _diag34():
    w = torch.zeros(3, 4)
    w[0, 0], w[1, 1], w[2, 2] = 3.0, -2.0, 1.0  # singular values 3, 2, 1 (sign does not matter)
    return w


def test_singular_values_by_hand():
    s = lowrank.singular_values(_diag34())
    assert s.dtype == torch.float64
    torch.testing.assert_close(s, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    # [[1, 1], [1, 1]] = 2 * u u^T with u = (1, 1)/sqrt(2): singular values 2 and 0
    torch.testing.assert_close(lowrank.singular_values(torch.ones(2, 2)),
                               torch.tensor([2.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)


def test_best_rank_r_by_hand():
    w = _diag34()
    expected = torch.zeros(3, 4, dtype=torch.float64)
    expected[0, 0] = 3.0
    torch.testing.assert_close(lowrank.best_rank_r(w, 1), expected, atol=1e-12, rtol=0)
    expected[1, 1] = -2.0
    torch.testing.assert_close(lowrank.best_rank_r(w, 2), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(lowrank.best_rank_r(w, 3), w.double(), atol=1e-12, rtol=0)
    assert float(lowrank.best_rank_r(w, 0).abs().max()) == 0.0


def test_errors_and_energy_by_hand():
    w = _diag34()
    s = lowrank.singular_values(w)
    for r, err in [(0, math.sqrt(14)), (1, math.sqrt(5)), (2, 1.0), (3, 0.0)]:
        assert lowrank.eckart_young_error(s, r) == pytest.approx(err, abs=1e-12)
        assert lowrank.reconstruction_error(w, r) == pytest.approx(err, abs=1e-12)
    assert lowrank.energy_captured(s, 1) == pytest.approx(9 / 14)
    assert lowrank.energy_captured(s, 2) == pytest.approx(13 / 14)
    assert lowrank.rank_for_energy(s, 0.5) == 1
    assert lowrank.rank_for_energy(s, 0.9) == 2
    assert lowrank.rank_for_energy(s, 13 / 14) == 2
    assert lowrank.rank_for_energy(s, 1.0) == 3
    assert lowrank.energy_captured(torch.zeros(3), 1) == 1.0
    assert lowrank.rank_for_energy(torch.zeros(3), 0.9) == 0


def test_eckart_young_on_random_matrices_against_numpy():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 20))
    s_ref = np.linalg.svd(a, compute_uv=False)
    w32 = torch.tensor(a, dtype=torch.float32)
    w64 = torch.tensor(a)
    np.testing.assert_allclose(lowrank.singular_values(w64).numpy(), s_ref, rtol=1e-12)
    for r in range(0, 21, 4):
        ey = lowrank.eckart_young_error(s_ref, r)
        assert ey == pytest.approx(math.sqrt((s_ref[r:] ** 2).sum()), rel=1e-12)
        assert lowrank.reconstruction_error(w64, r) == pytest.approx(ey, rel=1e-9, abs=1e-9)
        # a float32 input is promoted: only its own rounding (~1e-7) remains
        assert lowrank.reconstruction_error(w32, r) == pytest.approx(ey, rel=1e-5, abs=1e-5)
        if r:
            assert np.linalg.matrix_rank(lowrank.best_rank_r(w64, r).numpy()) == r


def test_truncated_svd_beats_other_rank_r_matrices():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 9, generator=g, dtype=torch.float64)
    r = 3
    best = lowrank.reconstruction_error(w, r)
    for _ in range(20):  # random rank-3 candidates, and perturbations of the optimum
        cand = torch.randn(12, r, generator=g, dtype=torch.float64) @ torch.randn(r, 9, generator=g,
                                                                                  dtype=torch.float64)
        assert float(torch.linalg.matrix_norm(w - cand)) > best
        bumped = lowrank.best_rank_r(w + 1e-2 * torch.randn(12, 9, generator=g, dtype=torch.float64), r)
        assert float(torch.linalg.matrix_norm(w - bumped)) >= best - 1e-12


def test_random_spectrum_has_the_asked_norm_and_is_seeded():
    s = lowrank.random_spectrum((64, 32), norm=5.0, seed=3)
    assert s.shape == (32,)
    assert float(torch.sqrt((s ** 2).sum())) == pytest.approx(5.0, rel=1e-12)
    torch.testing.assert_close(s, lowrank.random_spectrum((64, 32), norm=5.0, seed=3))
    assert not torch.equal(s, lowrank.random_spectrum((64, 32), norm=5.0, seed=4))
    # no structure: the top 4 of 32 directions hold far less than half the energy
    assert lowrank.energy_captured(s, 4) < 0.35


def test_snapshot_and_weight_updates():
    torch.manual_seed(0)
    model = nn.ModuleDict({"layer": nn.ModuleDict({"query": nn.Linear(4, 3), "value": nn.Linear(4, 3),
                                                   "key": nn.Linear(4, 3)})})
    before = lowrank.snapshot(model)
    assert sorted(before) == ["layer.query", "layer.value"]
    with torch.no_grad():
        model["layer"]["query"].weight += 0.5
    delta = lowrank.weight_updates(before, lowrank.snapshot(model))
    torch.testing.assert_close(delta["layer.query"], torch.full((3, 4), 0.5, dtype=torch.float64))
    assert float(delta["layer.value"].abs().max()) == 0.0
    with pytest.raises(ValueError, match="no module name"):
        lowrank.snapshot(model, ("dense",))
    with pytest.raises(KeyError):
        lowrank.weight_updates(before, {"layer.query": before["layer.query"]})


def test_parameter_counts_by_hand():
    # the seed post's setting: d = 768 (BERT-base, L = 12), r = m = b = 8
    assert lowrank.lora_parameters(768, 768, 8) == 12_288  # one square matrix: 2 d r
    assert lowrank.lora_parameters(768, 768, 8, matrices=2 * 12) == 294_912  # q and v in 12 layers
    assert lowrank.lora_parameters(384, 1536, 4) == 4 * (384 + 1536)  # a non-square matrix
    assert lowrank.prefix_parameters(12, 8, 768) == 2 * 12 * 8 * 768 == 147_456
    assert lowrank.prompt_parameters(8, 768) == 6_144
    assert lowrank.adapter_parameters(768, 8, sites_per_layer=1) == 2 * 768 * 8 + 8 + 768 == 13_064
    assert lowrank.adapter_parameters(768, 8, num_layers=12) == 13_064 * 2 * 12 == 313_536
    # with the MLP: embedding m d, Linear(d, h), Linear(h, 2 L d)
    assert lowrank.prefix_parameters(6, 16, 384, hidden=256) == (16 * 384 + 384 * 256 + 256
                                                                 + 256 * 4608 + 4608) == 1_288_960
    for bad in [dict(d_in=0, d_out=3, r=1), dict(d_in=3, d_out=3, r=True)]:
        with pytest.raises(ValueError):
            lowrank.lora_parameters(**bad)
    with pytest.raises(ValueError):
        lowrank.eckart_young_error(torch.ones(3), 4)
    with pytest.raises(ValueError):
        lowrank.best_rank_r(torch.ones(2, 2, 2), 1)


def test_parameter_counts_match_the_modules():
    """The formulas against real peftlab modules of the same shapes (tiny BERT, no download)."""
    import transformers as T

    import peftlab

    torch.manual_seed(0)
    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                       vocab_size=50, max_position_embeddings=64)
    model = peftlab.inject(T.BertForSequenceClassification(cfg), peftlab.LoRAConfig(r=4))
    assert peftlab.count_parameters(model).by_kind["lora"] == lowrank.lora_parameters(32, 32, 4, matrices=2 * 3)
    from peftlab.adapters import Bottleneck
    from peftlab.prefix import PrefixEncoder

    assert sum(p.numel() for p in Bottleneck(32, 8).parameters()) == lowrank.adapter_parameters(32, 8, 1)
    flat = PrefixEncoder(3, kv_heads=4, head_dim=8, num_virtual_tokens=5, hidden_size=32)
    assert sum(p.numel() for p in flat.parameters()) == lowrank.prefix_parameters(3, 5, 32)
    mlp = PrefixEncoder(3, kv_heads=4, head_dim=8, num_virtual_tokens=5, hidden_size=32, projection_hidden=16)
    assert sum(p.numel() for p in mlp.parameters()) == lowrank.prefix_parameters(3, 5, 32, hidden=16)
