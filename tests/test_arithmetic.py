"""peftlab.arithmetic / peftlab.merging: combining LoRA adapters, checked against HF peft and by hand."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from lora_helpers import assert_unchanged, clone, ids, out, snapshot, tiny

from peftlab import merging
from peftlab.arithmetic import COMBINATION_TYPES, add_weighted_adapter
from peftlab.config import LoRAConfig
from peftlab.ia3 import IA3Config
from peftlab.inject import delete, inject, merge, set_active, unmerge
from peftlab.io import load_adapter, save_adapter
from peftlab.lora import LoRALinear
from peftlab.registry import configs

NEEDS_DENSITY = {"ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                 "magnitude_prune", "magnitude_prune_svd"}
QV = {"llama": ("q_proj", "v_proj"), "bert": ("query", "value")}
QK = {"llama": ("q_proj", "k_proj"), "bert": ("query", "key")}


def _randomize(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _two_adapters(kind="llama", ranks=(4, 4), other_targets=False, saves=(), rslora=False):
    """Adapters "a" and "b" with random A and B on a tiny model (and the base model, untouched)."""
    base = tiny(kind)
    model = clone(base)
    inject(model, LoRAConfig(r=ranks[0], alpha=8, target_modules=QV[kind], modules_to_save=saves,
                             use_rslora=rslora), name="a")
    inject(model, LoRAConfig(r=ranks[1], alpha=4, target_modules=(QK if other_targets else QV)[kind],
                             modules_to_save=saves, use_rslora=rslora), name="b")
    _randomize(model)
    return base, model


def _peft_twin(base, model, tmp_path):
    """An HF peft model of the same base holding the same adapters "a" and "b" (via peftlab's files)."""
    for n in ("a", "b"):
        save_adapter(model, tmp_path / n, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(clone(base), tmp_path / "a", adapter_name="a")
        pm.load_adapter(tmp_path / "b", adapter_name="b")
    return pm.eval()


def _deltas(model, name):
    return {p: (m.lora_B[name].weight @ m.lora_A[name].weight) * m.scaling[name]
            for p, m in model.named_modules() if isinstance(m, LoRALinear) and name in m.lora_A}


def _peft_deltas(pm, name):
    return {p.removeprefix("base_model.model."): m.get_delta_weight(name) for p, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer) and name in m.lora_A}


def _kwargs(kind):
    kw = {"density": 0.5} if kind in NEEDS_DENSITY else {}
    return kw | ({"svd_rank": 3} if kind.endswith("svd") else {})


def _both(pm, model, kind, weights, seed=11, **kw):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_weighted_adapter(["a", "b"], weights, "m", combination_type=kind, **kw)
    torch.manual_seed(seed)
    add_weighted_adapter(model, ["a", "b"], weights, "m", kind, **kw)
    pm.set_adapter("m")


@pytest.mark.parametrize("kind", COMBINATION_TYPES)
def test_every_combination_equals_peft(kind, tmp_path):
    base, model = _two_adapters("llama")
    pm = _peft_twin(base, model, tmp_path)
    _both(pm, model, kind, [0.8, -0.5], **_kwargs(kind))
    ours, theirs = _deltas(model, "m"), _peft_deltas(pm, "m")
    assert ours.keys() == theirs.keys() and len(ours) == 4
    for p in ours:
        assert (ours[p] - theirs[p]).abs().max() <= 1e-5, p
    x = ids()
    assert (out(model, x) - out(pm, x)).abs().max() <= 1e-5
    assert (out(model, x) - out(base, x)).abs().max() > 1e-3  # the merge does change the outputs


@pytest.mark.parametrize("kind", ["cat", "svd", "ties_svd", "dare_ties_svd", "magnitude_prune_svd"])
def test_different_ranks_and_targets_equal_peft(kind, tmp_path):
    base, model = _two_adapters("bert", ranks=(4, 2), other_targets=True)
    pm = _peft_twin(base, model, tmp_path)
    _both(pm, model, kind, [1.0, 0.7], **_kwargs(kind))
    ours, theirs = _deltas(model, "m"), _peft_deltas(pm, "m")
    assert ours.keys() == theirs.keys() and len(ours) == 6  # query, key, value in 2 layers: the union
    for p in ours:
        assert (ours[p] - theirs[p]).abs().max() <= 1e-5, p
    assert (out(model, ids()) - out(pm, ids())).abs().max() <= 1e-5
    assert configs(model)["m"].target_modules == ("query", "value", "key")
    assert configs(model)["m"].r == (6 if kind == "cat" else 3)


def test_cat_is_the_exact_weighted_sum_and_linear_has_cross_terms():
    _, model = _two_adapters("llama", rslora=True)  # rsLoRA sources: the scalings live in the factors
    add_weighted_adapter(model, ["a", "b"], [0.6, 1.5], "cat", "cat")
    add_weighted_adapter(model, ["a", "b"], [0.6, 1.5], "lin", "linear")
    for p, m in model.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        f = {n: (m.lora_A[n].weight.double(), m.lora_B[n].weight.double(), m.scaling[n]) for n in ("a", "b")}
        want = sum(w * s * b @ a for w, (a, b, s) in zip((0.6, 1.5), f.values()))  # float64 by hand
        cat = (m.lora_B["cat"].weight @ m.lora_A["cat"].weight).double() * m.scaling["cat"]
        assert m.scaling["cat"] == 1.0 and (cat - want).abs().max() <= 1e-5
        c = [0.6 * f["a"][2], 1.5 * f["b"][2]]
        cross = c[0] ** 0.5 * c[1] ** 0.5 * (f["a"][1] @ f["b"][0] + f["b"][1] @ f["a"][0])
        lin = (m.lora_B["lin"].weight @ m.lora_A["lin"].weight).double()
        assert (lin - (want + cross)).abs().max() <= 1e-5
        assert cross.norm() > 0.1 * want.norm()  # the cross terms are not small


def test_svd_is_the_best_rank_k_approximation():
    _, model = _two_adapters("llama", ranks=(4, 4))
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "s3", "svd", svd_rank=3)
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "s8", "svd", svd_rank=8)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            full = sum(m.scaling[n] * m.lora_B[n].weight.double() @ m.lora_A[n].weight.double() for n in "ab")
            sv = torch.linalg.svdvals(full)
            err3 = (full - (m.lora_B["s3"].weight @ m.lora_A["s3"].weight).double()).norm()
            assert abs(err3 - sv[3:].norm()) <= 1e-4  # Eckart-Young: the tail singular values
            err8 = (full - (m.lora_B["s8"].weight @ m.lora_A["s8"].weight).double()).norm()
            assert err8 <= 1e-4  # rank 8 = 4 + 4 holds the sum exactly


def test_result_is_a_normal_adapter_save_load_merge_delete(tmp_path):
    base, model = _two_adapters("llama")
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "m", "ties", density=0.7)
    x = ids()
    assert configs(model)["m"].r == 4 and configs(model)["m"].alpha == 4
    ref = out(model, x)
    save_adapter(model, tmp_path / "m", "m")
    mine = load_adapter(clone(base), tmp_path / "m", "m")
    assert (out(mine, x) - ref).abs().max() <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(clone(base), tmp_path / "m").eval()
    assert (out(pm, x) - ref).abs().max() <= 1e-5
    merge(model)
    assert (out(model, x) - ref).abs().max() <= 1e-5
    unmerge(model)
    set_active(model, "a")
    delete(model, "m")
    assert list(configs(model)) == ["a", "b"]
    assert not any("lora_A.m." in k for k in model.state_dict())


def test_heads_mean_or_one_source():
    _, model = _two_adapters("bert", saves=("classifier",))
    with torch.no_grad():
        for n in "ab":
            model.classifier.modules_to_save[n].weight.normal_()
    add_weighted_adapter(model, ["a", "b"], [1.0, 3.0], "mean", "cat", head="mean")
    add_weighted_adapter(model, ["a", "b"], [1.0, 3.0], "fromb", "cat", head="b")
    copies = model.classifier.modules_to_save
    want = (copies["a"].weight + 3 * copies["b"].weight) / 4
    assert torch.allclose(copies["mean"].weight, want, atol=1e-6)
    assert torch.equal(copies["fromb"].weight, copies["b"].weight)
    assert configs(model)["mean"].modules_to_save == ("classifier",)
    # weights (0, 1) with b's head: the merged adapter is adapter "b" itself
    add_weighted_adapter(model, ["a", "b"], [0.0, 1.0], "justb", "cat", head="b")
    set_active(model, "justb")
    got = out(model, ids())
    set_active(model, "b")
    assert (got - out(model, ids())).abs().max() <= 1e-5


def _refused(model, match, *args, **kw):
    before, names = snapshot(model), list(configs(model))
    with pytest.raises((ValueError, RuntimeError)) as err:
        add_weighted_adapter(model, *args, **kw)
    assert err.match(match)
    assert_unchanged(model, before)
    assert list(configs(model)) == names


def test_bad_input_is_refused_before_any_change():
    _, model = _two_adapters("llama", ranks=(4, 2), other_targets=True)
    ab = (["a", "b"], [1.0, 1.0])
    _refused(model, "linear.*one rank.*'cat' or 'svd'", *ab, "m", "linear")
    _refused(model, "ties.*one rank", *ab, "m", "ties", density=0.5)
    _refused(model, "no adapter named 'c'.*\\['a', 'b'\\]", ["a", "c"], [1.0, 1.0], "m", "cat")
    _refused(model, "one number per adapter \\(2\\), got 1", ["a", "b"], [1.0], "m", "cat")
    _refused(model, "svd_rank must be a positive int, got 0", *ab, "m", "svd", svd_rank=0)
    _refused(model, "svd_rank=64 exceeds min\\(in, out\\) = 16", *ab, "m", "svd", svd_rank=64)
    _refused(model, "needs density", *ab, "m", "ties_svd")
    _refused(model, "density must be a number in \\(0, 1\\].*got 1.5", *ab, "m", "ties_svd", density=1.5)
    _refused(model, "density must be.*got 0", *ab, "m", "dare_linear_svd", density=0)
    _refused(model, "does not prune", *ab, "m", "cat", density=0.5)
    _refused(model, "unknown combination_type 'mean'", *ab, "m", "mean")
    _refused(model, "majority_sign_method", *ab, "m", "ties_svd", density=0.5, majority_sign_method="vote")
    _refused(model, "'a' already exists.*peftlab.delete", *ab, "a", "cat")
    _refused(model, "without dots, got 'x.y'", *ab, "x.y", "cat")
    _refused(model, "without dots, got ''", *ab, "", "cat")
    for clash in ("forward", "double", "keys"):  # would break the per-adapter ModuleDicts (inject fails part-way)
        _refused(model, f"{clash!r} is an attribute of torch's nn.ModuleDict", *ab, clash, "cat")
    _refused(model, "head='mean', but none", *ab, "m", "cat", head="mean")
    _refused(model, "twice", ["a", "a"], [1.0, 1.0], "m", "cat")
    merge(model)
    _refused(model, "unmerge", *ab, "m", "cat")


def test_refuses_dora_non_lora_and_missing_heads():
    base = tiny("llama")
    model = inject(clone(base), LoRAConfig(r=4, target_modules=QV["llama"], use_dora=True), name="d")
    inject(model, LoRAConfig(r=4, target_modules=QV["llama"]), name="p")
    _refused(model, "'d' is a DoRA adapter", ["d", "p"], [1.0, 1.0], "m", "cat")
    inject(model, IA3Config(target_modules=("k_proj",), feedforward_modules=()), name="i")
    _refused(model, "'i' \\(IA3Config\\) is not a LoRA adapter", ["p", "i"], [1.0, 1.0], "m", "cat")
    _, heads = _two_adapters("bert", saves=("classifier",))
    _refused(heads, "head='mean'.*or head='a'", ["a", "b"], [1.0, 1.0], "m", "cat")
    _refused(heads, "weights, which must be positive", ["a", "b"], [1.0, -1.0], "m", "cat", head="mean")
    _refused(heads, "got 'c'", ["a", "b"], [1.0, 1.0], "m", "cat", head="c")


def test_merging_functions_by_hand():
    t1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    t2 = torch.tensor([[-1.0, -2.0], [1.0, -4.0]])
    assert torch.equal(merging.magnitude_prune(t1, 0.5), torch.tensor([[3.0, 0.0], [0.0, 2.0]]))
    # TIES at density 1: signs by total mass: +2, -3, +1.5, -2 -> keep (3, -1|-2, 0.5|1, -4)
    got = merging.ties([t1, t2], torch.tensor([1.0, 1.0]), 1.0)
    assert torch.equal(got, torch.tensor([[3.0, -1.5], [0.75, -4.0]]))
    freq = merging.ties([t1, t2], torch.tensor([1.0, 1.0]), 1.0, "frequency")  # ties of counts elect +
    assert torch.equal(freq, torch.tensor([[3.0, -1.5], [0.75, 2.0]]))
    torch.manual_seed(0)
    big = torch.randn(200, 200)
    dropped = merging.random_drop(big, 0.3)
    kept = (dropped != 0).float().mean()
    assert abs(kept - 0.3) < 0.02 and torch.allclose(dropped[dropped != 0], big[dropped != 0] / 0.3)
    mean = sum(merging.dare_linear([big], [1.0], 0.5) for _ in range(200)) / 200  # E[DARE] = task arithmetic
    assert (mean - big).abs().mean() < 0.1 * big.abs().mean()


def test_real_minilm_cat_reproduces_each_source(minilm):
    model, tok = minilm
    model = copy.deepcopy(model).eval()
    for n in ("rt", "imdb"):
        inject(model, LoRAConfig(r=8, alpha=16, modules_to_save=("classifier",)), name=n)
    _randomize(model)
    batch = tok(["a fine film", "dull and far too long"], return_tensors="pt", padding=True)
    add_weighted_adapter(model, ["rt", "imdb"], [1.0, 0.0], "m", "cat", head="rt")
    assert configs(model)["m"].r == 16 and configs(model)["m"].target_modules == ("query", "value")
    with torch.no_grad():
        got = model(**batch).logits
        set_active(model, "rt")
        want = model(**batch).logits
    assert (got - want).abs().max() <= 1e-5
    add_weighted_adapter(model, ["rt", "imdb"], [0.5, 0.5], "avg", "svd", svd_rank=16, head="mean")
    set_active(model, "avg")
    assert torch.isfinite(model(**batch).logits).all()


# -- the notebook's exercises: a right answer passes, the typical wrong ones fail ------------------
def _ties_right(tau, w):
    weighted = tau * w.view(-1, *[1] * (tau.dim() - 1))
    elected = torch.where(tau.sum(0) >= 0, 1.0, -1.0)
    agree = tau.sign() == elected
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _ties_on_weighted(tau, w):
    return _ties_right(tau * w.view(-1, *[1] * (tau.dim() - 1)), torch.ones_like(w))


def _ties_mean_over_n(tau, w):
    weighted = tau * w.view(-1, *[1] * (tau.dim() - 1))
    agree = tau.sign() == torch.where(tau.sum(0) >= 0, 1.0, -1.0)
    return (weighted * agree).sum(0) / tau.shape[0]


def test_ties_exercise():
    from peftlab.exercises_merging import check_ties_combine

    assert check_ties_combine(_ties_right, quiet=True)
    for wrong, hint in ((lambda t, w: (t * w.view(-1, *[1] * (t.dim() - 1))).sum(0), "plain weighted sum"),
                        (_ties_on_weighted, "unweighted"), (_ties_mean_over_n, "number of task vectors")):
        verdict = check_ties_combine(wrong, quiet=True)
        assert not verdict and hint in verdict.message
    pending = check_ties_combine(lambda t, w: None, quiet=True)
    assert not pending and pending.pending


def test_merge_rank_exercise():
    from peftlab.exercises_merging import check_merge_rank

    def right(As, Bs, ws):
        return int(torch.linalg.matrix_rank(sum(w * b @ a for a, b, w in zip(As, Bs, ws))))

    assert check_merge_rank(right, quiet=True)
    verdict = check_merge_rank(lambda As, Bs, ws: sum(a.shape[0] for a in As), quiet=True)
    assert not verdict and "upper bound" in verdict.message
    verdict = check_merge_rank(lambda As, Bs, ws: As[0].shape[0], quiet=True)
    assert not verdict and "factor-wise" in verdict.message
