"""Adapter and checkpoint files: refused inits, safe saving, validation before loading.

Each test here failed on the code before its fix: HF peft adapters whose initialisation
rewrote the base weights (PiSSA, OLoRA, ...), ``exclude_modules``, saves that deleted
unrelated files or left no adapter after an interrupt, checkpoint re-saves and rotation,
resumes that half-loaded a damaged checkpoint, and tensors of the wrong dtype or with NaN.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import peft
import pytest
import torch
from lora_helpers import assert_unchanged, clone, ids, out, randomize_lora_b, snapshot, targets, tiny
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_helpers import freeze_all_but, tiny_bert

from peftlab import checkpoint as ckpt
from peftlab.config import AdapterConfig, LoRAConfig
from peftlab.inject import inject
from peftlab.io import adapter_state_dict, load_adapter, save_adapter
from peftlab.train import param_groups

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
TMP_MARK = ".peftlab-tmp-"  # what peftlab.atomic puts in every temporary name


# --- helpers ------------------------------------------------------------------------------

def _peft_adapter(tmp_path: Path, base, **kw) -> Path:
    """A LoRA adapter saved by HF peft (random lora_B, so it changes the outputs)."""
    cfg = dict(r=4, lora_alpha=8, target_modules=list(targets("bert")))
    cfg.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(clone(base), peft.LoraConfig(**cfg)).eval()
    randomize_lora_b(pm)
    pm.save_pretrained(tmp_path / "p")
    return tmp_path / "p"


def _edit_json(path: Path, **changes) -> None:
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def _peft_load(base, d: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(clone(base), d).eval()


def _lora(seed: int = 3):
    base = tiny("bert")
    model = inject(clone(base), LoRAConfig(r=4, alpha=8, target_modules=targets("bert")))
    randomize_lora_b(model, seed=seed)
    return base, model


def _rewrite(path: Path, change) -> None:
    """Rewrite a safetensors file through ``change(tensors)``, keeping its metadata."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


class Interrupted(BaseException):
    """Ctrl-C (or a kill) at an awkward moment."""


def _renames_fail(monkeypatch, at: int, exc: type[BaseException], forever: bool = False) -> dict:
    """Make the ``at``-th os.replace/os.rename call (counted together) raise ``exc``; with
    ``forever``, that call and every later one (the process is dead: no clean-up runs)."""
    calls = {"n": 0}
    real = {"replace": os.replace, "rename": os.rename}

    def wrap(which):
        def fake(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == at or (forever and calls["n"] > at):
                raise exc(f"interrupted at rename #{calls['n']}")
            return real[which](*args, **kwargs)
        return fake

    monkeypatch.setattr(os, "replace", wrap("replace"))
    monkeypatch.setattr(os, "rename", wrap("rename"))
    return calls


def _loaded_lora(base, d: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter_state_dict(load_adapter(clone(base), d)).items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- bug 5: peft inits that rewrote the base weights; exclude_modules -------------------------

@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_init_that_rewrote_the_base_weights_is_refused(tmp_path, init):
    base = tiny("bert")
    d = _peft_adapter(tmp_path, base)
    _edit_json(d / CONFIG, init_lora_weights=init)
    target = clone(base)
    before = snapshot(target)
    with pytest.raises(ValueError) as info:
        load_adapter(target, d)
    assert_unchanged(target, before)
    msg = str(info.value)
    assert repr(init) in msg and "base" in msg and "weights" in msg
    if init == "loftq":
        assert "merge_and_unload" in msg
    else:
        assert "path_initial_model_for_weight_conversion" in msg


def test_unknown_init_is_refused(tmp_path):
    base = tiny("bert")
    d = _peft_adapter(tmp_path, base)
    _edit_json(d / CONFIG, init_lora_weights="future_init")
    with pytest.raises(ValueError, match="'future_init'"):
        load_adapter(clone(base), d)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_inits_that_leave_the_base_alone_load_like_peft(tmp_path, init):
    """These only set lora_A / lora_B, which the file overwrites: peft and peftlab agree."""
    base, x = tiny("bert"), ids()
    d = _peft_adapter(tmp_path, base)
    _edit_json(d / CONFIG, init_lora_weights=init)
    ours = load_adapter(clone(base), d)
    assert (out(ours, x) - out(_peft_load(base, d), x)).abs().max() <= 1e-5
    assert (out(ours, x) - out(base, x)).abs().max() > 1e-4


def test_pissa_converted_by_peft_loads_exactly(tmp_path):
    """The conversion the error message recommends gives a plain LoRA peftlab loads exactly."""
    base, x = tiny("bert"), ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(clone(base), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="pissa")).eval()
        pm.save_pretrained(tmp_path / "init")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # "training"
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(tmp_path / "trained")
        pm.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    with pytest.raises(ValueError, match="'pissa'"):
        load_adapter(clone(base), tmp_path / "trained")
    ours = load_adapter(clone(base), tmp_path / "plain")  # on the original base weights
    assert (out(ours, x) - out(pm, x)).abs().max() <= 1e-5


@pytest.mark.parametrize("exclude", [["bert.encoder.layer.0.attention.self.query"], ["layer.0.attention.self.query"],
                                     r".*layer\.0\.attention\.self\.query"])
def test_exclude_modules_is_honoured(tmp_path, exclude):
    base, x = tiny("bert"), ids()
    d = _peft_adapter(tmp_path, base, exclude_modules=exclude)
    assert not any("layer.0.attention.self.query" in k for k in load_file(d / WEIGHTS))
    ours = load_adapter(clone(base), d)
    assert not hasattr(ours.bert.encoder.layer[0].attention.self.query, "lora_A")
    assert hasattr(ours.bert.encoder.layer[1].attention.self.query, "lora_A")
    assert (out(ours, x) - out(_peft_load(base, d), x)).abs().max() <= 1e-5


def test_exclude_modules_that_excludes_everything_is_refused(tmp_path):
    base = tiny("bert")
    d = _peft_adapter(tmp_path, base)
    _edit_json(d / CONFIG, exclude_modules=["query", "value"])
    target = clone(base)
    before = snapshot(target)
    with pytest.raises(ValueError, match="exclude_modules"):
        load_adapter(target, d)
    assert_unchanged(target, before)


@pytest.mark.parametrize("key, value", [("layer_replication", [[0, 2], [1, 2]]),
                                        ("rank_pattern", {"query": 2}), ("use_qalora", True),
                                        ("alora_invocation_tokens", [5, 6]), ("target_parameters", ["x.weight"])])
def test_peft_features_peftlab_does_not_compute_are_refused(tmp_path, key, value):
    """A file that needs layer replication, per-module ranks ... would load as plain LoRA and
    compute something else: refused, naming the key, and the model is left as it was."""
    base = tiny("bert")
    d = _peft_adapter(tmp_path, base)
    _edit_json(d / CONFIG, **{key: value})
    target = clone(base)
    before = snapshot(target)
    with pytest.raises(ValueError, match=f"peft features peftlab does not implement: \\['{key}'\\]"):
        load_adapter(target, d)
    assert_unchanged(target, before)


# --- bug 7: saving adapters --------------------------------------------------------------------

def test_save_keeps_unrelated_files(tmp_path):
    base, model = _lora()
    d = tmp_path / "run"
    (d / "logs").mkdir(parents=True)
    (d / "README.md").write_text("my notes")
    (d / "logs" / "train.txt").write_text("loss 0.1")
    save_adapter(model, d)
    randomize_lora_b(model, seed=7)
    save_adapter(model, d)  # and over an existing adapter
    assert (d / "README.md").read_text() == "my notes"
    assert (d / "logs" / "train.txt").read_text() == "loss 0.1"
    assert sorted(p.name for p in d.iterdir()) == ["README.md", CONFIG, WEIGHTS, "logs", "peftlab_adapter.json"]
    assert _same(_loaded_lora(base, d), {k: v.detach() for k, v in adapter_state_dict(model).items()})


@pytest.mark.parametrize("at", [1, 2, 3])
def test_interrupted_resave_keeps_the_old_adapter(tmp_path, monkeypatch, at):
    base, model = _lora()
    d = save_adapter(model, tmp_path / "a")
    old = _loaded_lora(base, d)
    randomize_lora_b(model, seed=7)
    _renames_fail(monkeypatch, at, Interrupted)
    with pytest.raises(Interrupted):
        save_adapter(model, d)
    monkeypatch.undo()
    assert _same(_loaded_lora(base, d), old)
    assert sorted(p.name for p in d.iterdir()) == [CONFIG, WEIGHTS, "peftlab_adapter.json"]  # temp files gone
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


@pytest.mark.parametrize("at", [1, 2, 3])
def test_killed_resave_never_leaves_a_silently_mixed_adapter(tmp_path, monkeypatch, at):
    """A kill mid-save (no clean-up runs) leaves the old adapter, the new one, or a clear error."""
    base, model = _lora()
    d = save_adapter(model, tmp_path / "a")
    old = _loaded_lora(base, d)
    randomize_lora_b(model, seed=7)
    new = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    _renames_fail(monkeypatch, at, Interrupted, forever=True)
    with pytest.raises(Interrupted):
        save_adapter(model, d)
    monkeypatch.undo()
    assert {CONFIG, WEIGHTS} <= {p.name for p in d.iterdir()}  # an adapter is still at the path
    try:
        got = _loaded_lora(base, d)
    except ValueError as exc:
        assert "interrupted" in str(exc)
    else:
        assert _same(got, old) or _same(got, new)
    save_adapter(model, d)  # the next save cleans up and succeeds
    assert _same(_loaded_lora(base, d), new)
    assert sorted(p.name for p in d.iterdir()) == [CONFIG, WEIGHTS, "peftlab_adapter.json"]


def test_interrupted_first_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    _, model = _lora()
    _renames_fail(monkeypatch, 1, Interrupted)
    with pytest.raises(Interrupted):
        save_adapter(model, tmp_path / "a")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def _fsynced_paths(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = os.fsync

    def spy(fd):
        seen.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to map descriptors to paths")
@pytest.mark.parametrize("existing", [False, True])
def test_weights_and_folders_are_fsynced(tmp_path, monkeypatch, existing):
    _, model = _lora()
    d = tmp_path / "a"
    if existing:
        save_adapter(model, d)
    seen = _fsynced_paths(monkeypatch)
    save_adapter(model, d)
    names = [Path(p).name for p in seen]
    assert any(WEIGHTS in n for n in names) and any(CONFIG in n for n in names)
    # the renames are made durable: of the new folder into its parent, or of the files inside the old folder
    assert str((d if existing else tmp_path).resolve()) in seen


def test_folders_and_files_honour_the_umask(tmp_path):
    _, model = _lora()
    old = os.umask(0o022)
    try:
        d = save_adapter(model, tmp_path / "deep" / "a")
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    for f in d.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name


def test_stale_temporaries_of_a_crashed_save_are_removed(tmp_path):
    _, model = _lora()
    d = save_adapter(model, tmp_path / "a")
    (d / f".{WEIGHTS}{TMP_MARK}0123abcd").write_bytes(b"half")  # this version's temp names
    (tmp_path / f".a{TMP_MARK}0123abcd").mkdir()
    (tmp_path / ".a.tmp-k2j4h5g6").mkdir()  # the temp folders earlier versions left behind
    (tmp_path / ".a.old-0123456789abcdef0123456789abcdef").mkdir()
    save_adapter(model, d)
    assert sorted(p.name for p in d.iterdir()) == [CONFIG, WEIGHTS, "peftlab_adapter.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


# --- bug 7: checkpoints ------------------------------------------------------------------------

def _trainer(seed: int = 0):
    """A model with a few trainable tensors and an AdamW that has taken one step."""
    model = freeze_all_but(tiny_bert(seed), "classifier", "query")
    groups, names = param_groups(model, 0.01)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    model(input_ids=torch.tensor([[1, 5, 9, 2]]), labels=torch.tensor([1])).loss.backward()
    opt.step()
    opt.zero_grad()
    return model, opt, names


def _save(root: Path, step: int, model, opt, names, keep=None) -> Path:
    return ckpt.save_checkpoint(root, step, model, opt, names,
                                {"epoch": 0, "batch_in_epoch": 0, "history": []}, keep=keep)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _opt_tensors(opt) -> dict[str, torch.Tensor]:
    return {f"{i}:{k}": v.clone() for i, s in opt.state_dict()["state"].items() for k, v in s.items()}


def _resumed(root: Path, seed: int = 5) -> dict[str, torch.Tensor]:
    model, opt, names = _trainer(seed)
    ckpt.load_checkpoint(root, model, opt, names)
    return _trainable(model)


@pytest.mark.parametrize("at", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("forever", [False, True])
def test_resaving_a_step_never_breaks_latest(tmp_path, monkeypatch, at, forever):
    model, opt, names = _trainer()
    _save(tmp_path, 4, model, opt, names)
    old = _trainable(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    new = _trainable(model)
    _renames_fail(monkeypatch, at, Interrupted, forever=forever)
    try:
        _save(tmp_path, 4, model, opt, names)
    except Interrupted:
        pass
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == "step-000004"
    try:
        got = _resumed(tmp_path)
    except ValueError as exc:  # only a kill between the file renames can leave this
        assert forever and "interrupted" in str(exc)
    else:
        assert _same(got, old) or _same(got, new)
        if not forever:
            assert _same(got, old) or at > 4  # rolled back, or interrupted after the last file
    _save(tmp_path, 4, model, opt, names)
    assert _same(_resumed(tmp_path), new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000004"]


def test_stale_pointer_and_folder_temporaries_are_removed(tmp_path):
    model, opt, names = _trainer()
    (tmp_path / ".tmp-latest-0a1b2c3d").write_text("step-000004\n")  # earlier versions' names
    (tmp_path / ".tmp-step-000004-0a1b2c3d").mkdir()
    (tmp_path / f".latest{TMP_MARK}0a1b2c3d").write_text("step-000004\n")
    _save(tmp_path, 4, model, opt, names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000004"]
    assert sorted(p.name for p in (tmp_path / "step-000004").iterdir()) == sorted(ckpt.FILES)


def test_rotation_sorts_steps_as_numbers(tmp_path):
    model, opt, names = _trainer()
    for step in (999_999, 1_000_000, 1_000_001):
        _save(tmp_path, step, model, opt, names, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1000000", "step-1000001"]
    assert (tmp_path / "latest").read_text().strip() == "step-1000001"


def test_checkpoint_folders_honour_the_umask(tmp_path):
    model, opt, names = _trainer()
    old = os.umask(0o022)
    try:
        path = _save(tmp_path / "ck", 4, model, opt, names)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "ck" / "latest").stat().st_mode) == 0o644
    for f in path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name


# --- bug 8: a damaged checkpoint is refused before anything is loaded --------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_first_tensor(path: Path) -> None:
    _rewrite(path, lambda t: t.pop(sorted(t)[0]))


def _drop_exp_avg(path: Path) -> None:
    _rewrite(path, lambda t: t.pop(next(k for k in sorted(t) if k.endswith("::exp_avg"))))


def _wrong_shape(path: Path) -> None:
    def change(t):
        key = next(k for k in sorted(t) if k.endswith("::exp_avg_sq"))
        t[key] = t[key].flatten()[:3].clone()
    _rewrite(path, change)


def _drop_state_key(path: Path) -> None:
    raw = json.loads(path.read_text())
    del raw["rng"]
    path.write_text(json.dumps(raw))


DAMAGES = [
    ("trainable.safetensors", _truncate), ("optimizer.safetensors", _truncate),
    ("rng.safetensors", _truncate), ("state.json", _truncate),
    ("trainable.safetensors", _drop_first_tensor), ("optimizer.safetensors", _drop_exp_avg),
    ("optimizer.safetensors", _wrong_shape), ("rng.safetensors", _drop_first_tensor),
    ("state.json", _drop_state_key),
]


@pytest.mark.parametrize("file, damage", DAMAGES, ids=[f"{f}-{d.__name__}" for f, d in DAMAGES])
def test_damaged_checkpoint_changes_nothing(tmp_path, file, damage):
    model, opt, names = _trainer()
    folder = _save(tmp_path, 4, model, opt, names)
    damage(folder / file)
    other, other_opt, _ = _trainer(seed=5)  # its own weights and optimizer state
    weights, state, rng = _trainable(other), _opt_tensors(other_opt), torch.get_rng_state()
    with pytest.raises(ValueError) as info:
        ckpt.load_checkpoint(tmp_path, other, other_opt, names)
    assert file in str(info.value)
    assert _same(_trainable(other), weights)
    assert _same(_opt_tensors(other_opt), state)
    assert torch.equal(torch.get_rng_state(), rng)


# --- bug 10: wrong dtypes and NaN are refused --------------------------------------------------

def _adapter_key(d: Path, part: str) -> str:
    return next(k for k in sorted(load_file(d / WEIGHTS)) if part in k)


@pytest.mark.parametrize("problem", ["int32", "nan", "inf"])
def test_lora_adapter_with_bad_tensor_is_refused(tmp_path, problem):
    base, model = _lora()
    d = save_adapter(model, tmp_path / "a")
    key = _adapter_key(d, "lora_B")

    def change(t):
        if problem == "int32":
            t[key] = (t[key] * 100).to(torch.int32)
        else:
            t[key][0, 0] = float(problem)
    _rewrite(d / WEIGHTS, change)
    target = clone(base)
    before = snapshot(target)
    with pytest.raises(ValueError) as info:
        load_adapter(target, d)
    assert_unchanged(target, before)
    msg = str(info.value)
    assert key in msg and WEIGHTS in msg
    assert ("torch.int32" in msg and "floating" in msg) if problem == "int32" else "NaN/inf" in msg


def test_bottleneck_adapter_with_nan_is_refused(tmp_path):
    base = tiny("bert")
    model = inject(clone(base), AdapterConfig(bottleneck=4), "s")
    d = save_adapter(model, tmp_path / "s", "s")
    _rewrite(d / WEIGHTS, lambda t: t["layers.0.ffn.W_up"].fill_(float("nan")))
    target = clone(base)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"layers\.0\.ffn\.W_up.*NaN/inf"):
        load_adapter(target, d)
    assert_unchanged(target, before)


def _int_trainable(path: Path) -> None:
    _rewrite(path, lambda t: t.update({"classifier.bias": t["classifier.bias"].to(torch.int32)}))


def _nan_trainable(path: Path) -> None:
    _rewrite(path, lambda t: t["classifier.weight"].fill_(float("nan")))


def _nan_optimizer(path: Path) -> None:
    _rewrite(path, lambda t: t["classifier.weight::exp_avg"].fill_(float("inf")))


@pytest.mark.parametrize("file, damage, words", [
    ("trainable.safetensors", _int_trainable, ["'classifier.bias'", "torch.int32", "torch.float32"]),
    ("trainable.safetensors", _nan_trainable, ["'classifier.weight'", "NaN/inf"]),
    ("optimizer.safetensors", _nan_optimizer, ["'classifier.weight::exp_avg'", "NaN/inf"]),
])
def test_checkpoint_with_bad_tensor_is_refused(tmp_path, file, damage, words):
    model, opt, names = _trainer()
    folder = _save(tmp_path, 4, model, opt, names)
    damage(folder / file)
    other, other_opt, _ = _trainer(seed=5)
    weights, state = _trainable(other), _opt_tensors(other_opt)
    with pytest.raises(ValueError) as info:
        ckpt.load_checkpoint(tmp_path, other, other_opt, names)
    for w in [file, *words]:
        assert w in str(info.value)
    assert _same(_trainable(other), weights)
    assert _same(_opt_tensors(other_opt), state)


@pytest.mark.parametrize("bad_file", ["adapter_config.json", "peftlab_adapter.json"])
def test_corrupt_json_error_names_the_file_that_is_bad(tmp_path, bad_file):
    """Two JSON files live in an adapter folder: the error must say which one is broken."""
    import peftlab
    from lora_helpers import ARCHS

    factory, targets = ARCHS["bert"]
    model = peftlab.inject(factory().eval(), peftlab.LoRAConfig(r=2, target_modules=targets))
    folder = peftlab.save_adapter(model, tmp_path / "a")
    (folder / bad_file).write_text("{not json", encoding="utf-8")
    fresh = factory().eval()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError) as err:
        peftlab.load_adapter(fresh, folder)
    assert bad_file in str(err.value)
    other = ({"adapter_config.json", "peftlab_adapter.json"} - {bad_file}).pop()
    assert other not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
