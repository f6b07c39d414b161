"""Mixed-adapter batches, hot-swap and the serving benchmark (peftlab.serving, peftlab.bench.mixed).

The reference for every mixed batch is each adapter run alone (``set_active``) on the same batch:
row i of the mixed output must equal row i of its own adapter's output.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import transformers as T
from lora_helpers import VOCAB, assert_unchanged, ids, randomize_lora_b, snapshot, tiny

from peftlab import exercises_serving as ex
from peftlab import serving
from peftlab.bench.mixed import add_adapters, format_mixed, measure
from peftlab.config import LoRAConfig, PrefixConfig
from peftlab.inject import delete, disabled, inject, merge, set_active
from peftlab.io import save_adapter
from peftlab.lora import LoRALinear
from peftlab.registry import active_adapter, configs
from peftlab.serving import BASE
from peftlab.wrappers import ModulesToSaveWrapper

NAMES = ["one", BASE, "two", "three", "one", BASE, "three"]


def _with_adapters(kind="bert", heads=True, dora=False, seed=0):
    """A tiny model with adapters one, two, three (random non-zero B, per-adapter heads for BERT)."""
    model = tiny(kind, seed=seed)
    q, v = ("query", "value") if kind == "bert" else ("q_proj", "v_proj")
    mts = ("classifier",) if kind == "bert" and heads else ()
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=(q, v), modules_to_save=mts), name="one")
    inject(model, LoRAConfig(r=2, alpha=4, target_modules=(q,), modules_to_save=mts), name="two")  # q only
    inject(model, LoRAConfig(r=4, alpha=4, target_modules=(v,), modules_to_save=mts, use_dora=dora), name="three")
    for j, n in enumerate(["one", "two", "three"]):
        randomize_lora_b(model, seed=10 + j, scale=0.5, name=n)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".modules_to_save." in n or "lora_magnitude_vector" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    set_active(model, "two")
    return model.eval()


def _alone(model, name, **batch):
    """Logits of adapter ``name`` alone (BASE: the base model) on the whole batch."""
    before = active_adapter(model)
    with torch.no_grad():
        if name == BASE:
            with disabled(model):
                out = model(**batch).logits
        else:
            set_active(model, name)
            out = model(**batch).logits
    set_active(model, before)
    return out


def _generate_alone(model, name, **kw):
    """Greedy ``generate`` of adapter ``name`` alone (BASE: the base model) on the whole batch."""
    before = active_adapter(model)
    if name == BASE:
        with disabled(model):
            out = model.generate(**kw, do_sample=False)
    else:
        set_active(model, name)
        out = model.generate(**kw, do_sample=False)
    set_active(model, before)
    return out


def _no_route_left(model):
    assert all(m.row_route is None for m in model.modules() if isinstance(m, (LoRALinear, ModulesToSaveWrapper)))


@pytest.mark.parametrize("kind,dora", [("bert", False), ("bert", True), ("llama", False)])
def test_each_row_equals_its_adapter_alone(kind, dora):
    model = _with_adapters(kind, dora=dora)
    x = ids(len(NAMES), 9)
    with torch.no_grad():
        mixed = serving.forward(model, {"input_ids": x}, NAMES).logits
    _no_route_left(model)
    assert active_adapter(model) == "two"  # untouched
    outs = {n: _alone(model, n, input_ids=x) for n in set(NAMES)}
    for i, n in enumerate(NAMES):
        assert (mixed[i] - outs[n][i]).abs().max() <= 1e-5, (i, n)
    # the adapters really differ from each other and from the base (the test can fail)
    for a, b in [("one", BASE), ("two", BASE), ("three", BASE), ("one", "two"), ("two", "three")]:
        assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)
    with torch.no_grad():  # the usual path is unchanged after the block
        assert torch.equal(model(input_ids=x).logits, outs["two"])


def test_mixed_generate_matches_each_adapter_alone():
    model = _with_adapters("llama")
    x = ids(len(NAMES), 5, seed=4)
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding of two rows
    mask[4, :1] = 0
    x = x.masked_fill(mask == 0, 0)
    kw = dict(input_ids=x, attention_mask=mask, max_new_tokens=6, pad_token_id=0)
    got = serving.generate(model, NAMES, **kw)
    _no_route_left(model)
    for n in set(NAMES):
        rows = [i for i, m in enumerate(NAMES) if m == n]
        assert torch.equal(got[rows], _generate_alone(model, n, **kw)[rows]), n
    set_active(model, "one")
    one = model.generate(**kw, do_sample=False)
    assert not torch.equal(one, got)  # the adapters' greedy outputs do differ


def test_bad_input_is_refused_and_changes_nothing():
    model = _with_adapters("bert")
    x = ids(3, 6)
    before = snapshot(model)
    bad = [
        (ValueError, "not loaded", lambda: serving.forward(model, {"input_ids": x}, ["one", "nope", BASE])),
        (ValueError, "3 rows but 2", lambda: serving.forward(model, {"input_ids": x}, ["one", "two"])),
        (TypeError, "one adapter name per row", lambda: serving.forward(model, {"input_ids": x}, "one")),
        (ValueError, "num_beams=2", lambda: serving.generate(model, ["one"] * 3, input_ids=x, num_beams=2)),
        (ValueError, "num_return_sequences=2",
         lambda: serving.generate(model, ["one"] * 3, input_ids=x, num_return_sequences=2)),
    ]
    for exc, text, call in bad:
        with pytest.raises(exc, match=text):
            call()
        assert_unchanged(model, before)
        _no_route_left(model)

    # a layer whose input has another number of rows than names: both numbers in the message
    with pytest.raises(ValueError, match="4 adapter names .* 3 rows"), serving.adapter_rows(model, ["one"] * 4):
        model(input_ids=x)
    _no_route_left(model)

    model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        serving.forward(model, {"input_ids": x}, ["one"] * 3)
    model.eval()
    with disabled(model), pytest.raises(RuntimeError, match="disabled"):
        serving.forward(model, {"input_ids": x}, ["one"] * 3)
    folded = copy.deepcopy(model)  # merging rounds the fp32 weights a little: not on the model itself
    set_active(folded, "one")
    merge(folded)
    with pytest.raises(RuntimeError, match="merged"):
        serving.forward(folded, {"input_ids": x}, ["one"] * 3)
    with serving.adapter_rows(model, ["one"] * 3), pytest.raises(RuntimeError, match="nested"):
        with serving.adapter_rows(model, ["two"] * 3):
            pass
    _no_route_left(model)
    with pytest.raises(KeyError), serving.adapter_rows(model, ["one"] * 3):  # restored after any exception
        raise KeyError("boom")
    _no_route_left(model)
    assert_unchanged(model, before)


def test_non_lora_adapter_is_refused():
    model = _with_adapters("bert", heads=False)
    inject(model, PrefixConfig(num_virtual_tokens=2), name="pre")  # now the active one
    with pytest.raises(RuntimeError, match="active adapter 'pre'"):
        serving.forward(model, {"input_ids": ids(2, 5)}, ["one", "two"])
    with pytest.raises(ValueError, match="route LoRA adapters only"):
        serving.forward(model, {"input_ids": ids(2, 5)}, ["one", "pre"])


# -- hot-swap --------------------------------------------------------------------------------
def _source(tmp_path, r=4, alpha=16, targets=("query", "value"), seed=0, kind_seed=0, folder="src", **kw):
    """A saved adapter for the tiny BERT (its own random B and head), and the logits it gives."""
    src = tiny("bert", seed=kind_seed)
    inject(src, LoRAConfig(r=r, alpha=alpha, target_modules=targets, modules_to_save=("classifier",), **kw),
           name="x")
    randomize_lora_b(src, seed=99 + seed, scale=0.5)
    with torch.no_grad():
        src.classifier.modules_to_save["x"].weight.mul_(-2.0)
    save_adapter(src, tmp_path / folder, "x")
    return src


def test_hotswap_copies_in_place_and_leaves_other_adapters_alone(tmp_path):
    model = _with_adapters("bert")
    x = ids(3, 7)
    src = _source(tmp_path, alpha=16)  # "one" has alpha 8: the scaling must follow the file
    layer = model.bert.encoder.layer[0].attention.self.query
    ids_before = {n: id(m) for n, m in model.named_modules()}
    tensors_before = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    others = {n: _alone(model, n, input_ids=x) for n in ("two", "three", BASE)}
    serving.hotswap(model, tmp_path / "src", "one")
    assert {n: id(m) for n, m in model.named_modules()} == ids_before  # same module objects
    assert {k: id(v) for k, v in model.state_dict(keep_vars=True).items()} == tensors_before
    assert layer.scaling["one"] == 16 / 4 and configs(model)["one"].alpha == 16
    with torch.no_grad():
        want = src(input_ids=x).logits
    assert (_alone(model, "one", input_ids=x) - want).abs().max() <= 1e-5
    for n, out in others.items():
        assert torch.equal(_alone(model, n, input_ids=x), out), n
    with torch.no_grad():  # and in a mixed batch
        mixed = serving.forward(model, {"input_ids": x}, ["one", "two", BASE]).logits
    assert (mixed[0] - want[0]).abs().max() <= 1e-5
    assert (mixed[1] - others["two"][1]).abs().max() <= 1e-5
    # unloading one adapter leaves the others as they were
    delete(model, "three")
    for n in ("one", "two"):
        expected = want if n == "one" else others["two"]
        assert (_alone(model, n, input_ids=x) - expected).abs().max() <= 1e-5


def test_hotswap_refusals_change_nothing(tmp_path):
    model = _with_adapters("bert")
    _source(tmp_path, r=8, folder="rank8")
    _source(tmp_path, targets=("query",), folder="q_only")
    _source(tmp_path, use_dora=True, folder="dora")
    wide = tiny("bert")
    wide.config.name_or_path = "someone/another-model"
    inject(wide, LoRAConfig(r=4, target_modules=("query", "value"), modules_to_save=("classifier",)), name="x")
    save_adapter(wide, tmp_path / "other_base", "x")
    model.config.name_or_path = "tiny-bert"
    before = snapshot(model)
    cases = [("rank8", "one", "rank r=8"), ("q_only", "one", "adapts other modules"),
             ("dora", "one", "use_dora=True"), ("other_base", "one", "another-model"),
             ("rank8", "missing", "no adapter named 'missing'"), ("nowhere", "one", "missing")]
    for folder, name, text in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=text):
            serving.hotswap(model, tmp_path / folder, name)
        assert_unchanged(model, before)
    # a base of another size: the shapes do not fit
    big = T.BertForSequenceClassification(T.BertConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=64)).eval()
    inject(big, LoRAConfig(r=4, target_modules=("query", "value"), modules_to_save=("classifier",)), name="x")
    save_adapter(big, tmp_path / "big", "x")
    with pytest.raises(ValueError, match="shape mismatch"):
        serving.hotswap(model, tmp_path / "big", "one")
    assert_unchanged(model, before)


def test_hotswap_reads_a_peft_written_adapter(tmp_path):
    base = tiny("llama")
    model = inject(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj")), name="a")
    randomize_lora_b(model, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"])).eval()
    randomize_lora_b(pm, seed=7)
    pm.save_pretrained(tmp_path / "p")
    serving.hotswap(model, tmp_path / "p", "a")
    x = ids(2, 6)
    with torch.no_grad():
        assert (model(input_ids=x).logits - pm(input_ids=x).logits).abs().max() <= 1e-5


# -- memory ----------------------------------------------------------------------------------
def test_memory_grows_by_the_adapters_bytes_only():
    model = tiny("llama")
    base = serving.model_bytes(model)
    names = add_adapters(model, 3, ("q_proj", "v_proj"), r=4)
    own = [serving.adapter_bytes(model, n) for n in names]
    # by hand: per layer A (4, 32) + B (32, 4) for q, A (4, 32) + B (16, 4) for v (2 kv heads of 8), 2 layers
    assert own == [4 * 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)] * 3
    assert serving.model_bytes(model) - base == sum(own)
    assert serving.model_bytes(model, model) == serving.model_bytes(model)  # shared storage counted once


# -- the benchmark's core on tiny models -------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_bench_measure_fields(kind):
    x = ids(8, 6)
    targets = ("query", "value") if kind == "bert" else ("q_proj", "v_proj")
    cases = measure(lambda: tiny(kind), {"input_ids": x, "attention_mask": torch.ones_like(x)}, (1, 4), targets,
                    rounds=1, new_tokens=3 if kind == "llama" else 0)
    assert [c["k"] for c in cases] == [1, 4]
    for c in cases:
        b = c["bytes"]
        assert b["growth_equals_adapters"] and b["growth"] == b["adapters"] > 0
        assert b["mixed"] == b["base"] + b["adapters"]
        assert b["merged_copies"] == c["k"] * b["base"]  # each copy: the plain model, adapter folded in
        for way in ("mixed", "separate", "merged"):
            assert c["rows_per_s"][way] == pytest.approx(8 / c["seconds"][way])
        assert c["mixed_over_separate"] == pytest.approx(c["seconds"]["separate"] / c["seconds"]["mixed"])
        if kind == "llama":
            assert c["rows_differing_from_separate"] == 0 and c["rows_differing_from_merged"] == 0
        else:
            assert c["max_abs_diff_vs_separate"] <= 1e-5 and c["max_abs_diff_vs_merged"] <= 1e-4
    table = format_mixed({"quick": True, "threads": 1, "workloads": {
        "classify" if kind == "bert" else "generate": {"model": kind, "settings": {"rows": 8, "seq": 6,
                                                                                   "new_tokens": 3},
                                                       "cases": cases, "peak_rss_mb": 1.0}}})
    assert table.count("\n| ") == 3 and "yes" in table


# -- the exercises' checkers -------------------------------------------------------------------
def _routed_solution(x, W, b, adapters, names):
    out = x @ W.T + b
    for n in set(names) - {BASE}:
        rows = torch.tensor([i for i, m in enumerate(names) if m == n])
        A, B, s = adapters[n]
        out[rows] += s * (x[rows] @ A.T @ B.T)
    return out


def test_check_routed_lora():
    assert ex.check_routed_lora(_routed_solution, quiet=True)
    first = lambda x, W, b, ad, names: _routed_solution(x, W, b, ad, [names[0]] * len(names))  # noqa: E731
    no_scale = lambda x, W, b, ad, names: _routed_solution(  # noqa: E731
        x, W, b, {n: (A, B, 1.0) for n, (A, B, _) in ad.items()}, names)
    base_gets_one = lambda x, W, b, ad, names: _routed_solution(  # noqa: E731
        x, W, b, ad, [next(iter(ad)) if n == BASE else n for n in names])
    for wrong in (first, no_scale, base_gets_one, lambda x, W, b, ad, names: x @ W.T + b):
        assert not ex.check_routed_lora(wrong, quiet=True)

    def unwritten(*args):
        raise NotImplementedError

    assert ex.check_routed_lora(unwritten, quiet=True).pending


def test_check_serving_memory():
    q = ex.MEMORY_QUESTION
    adapter = q["layers"] * q["r"] * (2 * q["hidden"] + q["hidden"] + q["v_out"]) * 4
    base = q["base_parameters"] * 4
    assert ex.check_serving_memory(q["k"] * base, base + q["k"] * adapter, quiet=True)
    assert not ex.check_serving_memory(base, base + q["k"] * adapter, quiet=True)  # one copy only
    assert not ex.check_serving_memory(q["k"] * base, q["k"] * adapter, quiet=True)  # base forgotten
    assert not ex.check_serving_memory(q["k"] * base // 4, base + q["k"] * adapter, quiet=True)  # parameters
    assert ex.check_serving_memory(None, None, quiet=True).pending


# -- the real models -----------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_mixed_classification_with_heads(minilm):
    base, tok = minilm
    model = copy.deepcopy(base).eval()
    for j, n in enumerate(["pos", "neg", "topic"]):
        inject(model, LoRAConfig(r=8, alpha=16, modules_to_save=("classifier",)), name=n)
        randomize_lora_b(model, seed=20 + j, scale=0.05, name=n)
        with torch.no_grad():
            model.classifier.modules_to_save[n].weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(j))
    texts = ["a gentle, funny film", "dull and far too long", "the plot never lands", "a quiet triumph",
             "i laughed twice", "worth a second look"]
    names = ["pos", BASE, "neg", "topic", "pos", BASE]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        mixed = serving.forward(model, dict(batch), names).logits
    outs = {n: _alone(model, n, **batch) for n in set(names)}
    for i, n in enumerate(names):
        assert (mixed[i] - outs[n][i]).abs().max() <= 1e-5, (i, n)
    assert min((outs[a] - outs[b]).abs().max() for a in outs for b in outs if a < b) > 1e-2


@pytest.mark.slow
def test_smollm2_mixed_generate(smollm2):
    base, tok = smollm2
    model = copy.deepcopy(base).eval()
    adapters = ["chef", "pirate", "poet"]
    for n in adapters:
        inject(model, LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj", "o_proj")), name=n)
    randomize_lora_b(model, seed=0, scale=0.15)  # large enough that greedy outputs differ
    prompts = ["Once upon a time,", "My favourite food is"]
    names = [n for _ in prompts for n in (*adapters, BASE)]  # each prompt under every adapter and the base
    texts = [p for p in prompts for _ in range(4)]
    batch = tok(texts, padding=True, padding_side="left", return_tensors="pt")
    kw = dict(**batch, max_new_tokens=10, pad_token_id=tok.pad_token_id)
    got = serving.generate(model, names, **kw)
    for n in (*adapters, BASE):
        rows = [i for i, m in enumerate(names) if m == n]
        assert torch.equal(got[rows], _generate_alone(model, n, **kw)[rows]), n
    new = got[:, batch["input_ids"].shape[1]:]
    for p in range(len(prompts)):  # sanity: four different continuations of the same prompt
        outs = {tuple(new[4 * p + j].tolist()) for j in range(4)}
        assert len(outs) == 4, [tok.decode(new[4 * p + j]) for j in range(4)]
    # the logits of one mixed forward equal each adapter's alone (float32), to 1e-5 of the logits' size:
    # through 30 layers the batch shape alone moves logits of ~30 by ~1e-4 (the same adapter run on its own
    # rows instead of the whole batch differs from itself that much), so an absolute 1e-5 is below float32's floor
    with torch.no_grad():
        mixed = serving.forward(model, dict(batch), names).logits
    keep = batch["attention_mask"].bool()
    for n in set(names):
        rows = [i for i, m in enumerate(names) if m == n]
        alone = _alone(model, n, **batch)
        ref = alone[rows][keep[rows]]
        assert (mixed[rows][keep[rows]] - ref).abs().max() <= 1e-5 * ref.abs().max(), n
    # in float64 the rounding floor is gone and the absolute bound holds: any routing slip
    # (a row given another adapter's branch, a branch added twice) would show as O(1) differences.
    # One prompt per name, unpadded: in float64 a fully masked pad row of the sdpa path is NaN.
    model64 = model.double()
    names64 = [*adapters, BASE, adapters[0]]
    batch64 = tok([prompts[1]] * len(names64), return_tensors="pt")
    with torch.no_grad():
        mixed64 = serving.forward(model64, dict(batch64), names64).logits
    for n in set(names64):
        rows = [i for i, m in enumerate(names64) if m == n]
        ref = _alone(model64, n, **batch64)[rows]
        assert torch.isfinite(ref).all() and (mixed64[rows] - ref).abs().max() <= 1e-5, n
