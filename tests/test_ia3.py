"""IA³ (peftlab.ia3) on tiny random BERT and Llama models, and against HF peft's IA³."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from lora_helpers import assert_unchanged, clone, ids, out, snapshot, tiny
from safetensors.torch import load_file

from peftlab.ia3 import IA3Config, IA3Linear, ia3_parameters
from peftlab.inject import count_parameters, delete, disabled, explain, inject, merge, set_active, unload, unmerge
from peftlab.io import adapter_state_dict, load_adapter, save_adapter
from peftlab.registry import configs

SAVES = {"bert": ("classifier",), "llama": (), "gpt2": ()}  # BERT's classifier is new: trained in full


def _config(kind: str) -> IA3Config:
    return IA3Config(modules_to_save=SAVES[kind])  # the model type's defaults: peft's


def _peft(base, kind: str):
    cfg = peft.IA3Config(modules_to_save=list(SAVES[kind]) or None)  # peft's defaults as well
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, cfg).eval()


def _randomize(model, seed: int = 5) -> None:
    """Non-trivial vectors (1 + 0.5 N(0, 1)) and a shifted head copy, so the adapter changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif p.requires_grad:  # the trainable classifier copy
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _formula(kind: str) -> int:
    """d_out per key/value layer + d_in per feed-forward layer, from the tiny configs (lora_helpers)."""
    if kind == "bert":  # key, value (out d); attention.output.dense (in d) and output.dense (in d_ff): both match
        d, d_ff, layers = 32, 64, 2  # "output.dense", peft's default feed-forward entry
        return layers * (d + d + d + d_ff)
    kv_out, d_ff, layers = 2 * 8, 64, 2  # k_proj, v_proj: n_kv_heads * head_dim; down_proj: in d_ff
    return layers * (kv_out + kv_out + d_ff)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_identity_at_init_and_parameter_count(kind):
    base, x = tiny(kind), ids()
    model = inject(clone(base), _config(kind))
    assert torch.equal(out(model, x), out(base, x))  # all vectors are ones
    count = count_parameters(model)
    head = sum(p.numel() for p in base.classifier.parameters()) if kind == "bert" else 0
    assert count.by_kind["ia3"] == _formula(kind) == ia3_parameters(base, _config(kind))
    assert count.trainable == _formula(kind) + head
    assert explain(base, _config(kind)).total_added == _formula(kind) + head
    layers = {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}
    ff = {n for n, m in layers.items() if m.feedforward["default"]}
    if kind == "bert":
        assert "bert.encoder.layer.0.attention.output.dense" in ff and "bert.encoder.layer.0.output.dense" in ff
        assert "bert.encoder.layer.0.attention.self.key" in set(layers) - ff
    else:
        assert ff == {f"model.layers.{i}.mlp.down_proj" for i in range(2)} and len(layers) == 6


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_same_outputs_keys_count_and_merge_as_peft(kind):
    base, x = tiny(kind), ids()
    pm = _peft(clone(base), kind)
    _randomize(pm)
    ours = inject(clone(base), _config(kind))
    theirs = peft.get_peft_model_state_dict(pm)
    mine = adapter_state_dict(ours)
    assert set(theirs) == set(mine)  # identical checkpoint keys
    for k, v in theirs.items():
        assert v.shape == mine[k].shape, k
        with torch.no_grad():
            mine[k].copy_(v)
    expected = out(pm, x)
    assert (expected - out(base, x)).abs().max() > 1e-2  # the vectors really do something
    assert (out(ours, x) - expected).abs().max() <= 1e-5
    assert count_parameters(ours).trainable == pm.get_nb_trainable_parameters()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_theirs = out(pm.merge_and_unload(), x)
    plain = unload(ours)
    assert not any(isinstance(m, IA3Linear) for m in plain.modules())
    assert (out(plain, x) - merged_theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_peftlab_file_loads_in_peft(kind, tmp_path):
    base, x = tiny(kind), ids()
    ours = inject(clone(base), _config(kind))
    _randomize(ours)
    save_adapter(ours, tmp_path / "a")
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert keys == set(adapter_state_dict(ours))  # adapter tensors only
    assert all(k.endswith(".ia3_l") or ".classifier." in k for k in keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(clone(base), str(tmp_path / "a")).eval()
    assert pm.peft_config["default"].peft_type == peft.PeftType.IA3
    assert (out(pm, x) - out(ours, x)).abs().max() <= 1e-5
    again = load_adapter(clone(base), tmp_path / "a")  # and load(save(x)) is exact
    assert torch.equal(out(again, x), out(ours, x))


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_peft_file_loads_in_peftlab(kind, tmp_path):
    base, x = tiny(kind), ids()
    pm = _peft(clone(base), kind)
    _randomize(pm)
    pm.save_pretrained(str(tmp_path / "p"))
    ours = load_adapter(clone(base), tmp_path / "p")
    assert isinstance(configs(ours)["default"], IA3Config)
    assert (out(ours, x) - out(pm, x)).abs().max() <= 1e-5
    assert (out(ours, x) - out(base, x)).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_merge_is_exact_and_unmerge_restores_the_weights(kind):
    base, x = tiny(kind), ids()
    model = inject(clone(base), _config(kind))
    _randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = out(model, x)
    merge(model)
    assert (out(model, x) - unmerged).abs().max() <= 1e-5
    with pytest.raises(RuntimeError, match="unmerge"):  # generic code refuses to switch while merged
        set_active(model, None)
    with pytest.raises(RuntimeError, match="already merged"):
        merge(model)
    unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit-exact: the pre-merge copies are put back
    assert torch.equal(out(model, x), unmerged)


def test_disable_delete_and_gradients():
    base, x = tiny("bert"), ids()
    model = inject(clone(base), _config("bert"))
    _randomize(model)
    with disabled(model):
        assert torch.equal(out(model, x), out(base, x))
    model.train()
    model(input_ids=x).logits.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "ia3_l" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    model.eval()
    delete(model, "default")
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    assert torch.equal(out(model, x), out(base, x)) and not any(p.requires_grad for p in model.parameters())


# -- bad input: a clear error naming the value and the fix, the model unchanged -------------------
@pytest.mark.parametrize("config, match", [
    (IA3Config(target_modules=("key", "classifier")), r"'classifier'.*output head.*modules_to_save=\['classifier'\]"),
    (IA3Config(target_modules=("key", "classifier"), modules_to_save=("classifier",)),
     r"'classifier'.*modules_to_save.*Remove it from target_modules or from modules_to_save"),
    (IA3Config(target_modules=("key", "word_embeddings")), r"'bert.embeddings.word_embeddings', a Embedding.*linear"),
    (IA3Config(target_modules=("key", "keyy")), r"\['keyy'\] match no module.*key"),
    (IA3Config(target_modules=".*nothing"), r"'\.\*nothing'\] match no module"),
])
def test_bad_targets_are_refused_and_the_model_is_unchanged(config, match):
    model = tiny("bert")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        inject(model, config)
    assert_unchanged(model, before)


def test_feedforward_modules_must_be_targets_like_peft():
    with pytest.raises(ValueError, match=r"feedforward_modules entries \['output.dense'\] are not in target_modules"
                                         r".*add \['output.dense'\] to target_modules"):
        IA3Config(target_modules=("key", "value"), feedforward_modules=("output.dense",))
    with pytest.raises(ValueError, match="subset"):  # peft's own rule
        peft.IA3Config(target_modules=["key", "value"], feedforward_modules=["output.dense"])
    with pytest.raises(ValueError, match="all-linear.*name them"):
        IA3Config(target_modules="all-linear")
    with pytest.raises(ValueError, match="defaults for model_type='bert'.*subset"):  # checked against the defaults
        inject(tiny("bert"), IA3Config(feedforward_modules=("query",)))
    # targets without feedforward_modules: the default feed-forward entries among the targets
    model = inject(tiny("bert"), IA3Config(target_modules=("key", "value")))
    assert not any(m.feedforward["default"] for m in model.modules() if isinstance(m, IA3Linear))


def test_unknown_model_type_needs_explicit_targets():
    model = tiny("distilbert")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no IA³ defaults for model_type='distilbert'.*q_lin"):
        inject(model, IA3Config())
    with pytest.raises(ValueError, match=r"feedforward_modules=\(\) for none"):
        inject(model, IA3Config(target_modules=("k_lin", "v_lin")))
    assert_unchanged(model, before)
    inject(model, IA3Config(target_modules=("k_lin", "v_lin", "lin2"), feedforward_modules=("lin2",)))
    assert count_parameters(model).by_kind["ia3"] == 2 * (32 + 32 + 64)
