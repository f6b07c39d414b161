"""Decoder prefixes in HF peft's format: peftlab numbers the real tokens 0..T-1, HF peft m..m+T-1.

Checks peftlab/prefix_io.py on tiny random decoders (eager attention, 4 query heads, 2 key/value
heads): rotary files are converted exactly (prefix keys turned by +m on save, -m on load), GPT-2
files cannot be and say so. Forward logits only: HF peft's cached generate with a prefix is broken.
Runs on the CPU, or on CUDA with PEFTLAB_DEVICE=cuda.
"""

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from peftlab import runtime
from peftlab.config import PrefixConfig
from peftlab.inject import inject
from peftlab.io import PEFTLAB_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from peftlab.prefix import record_attention
from peftlab.prefix_io import FROM_0, FROM_M, POSITIONS, TENSOR, _model_rope, _turn_keys

DEVICE = runtime.get_device(os.environ.get("PEFTLAB_DEVICE", "cpu"))
M, T, VOCAB = 5, 7, 97  # virtual tokens, real tokens, vocabulary
TINY = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, num_hidden_layers=2,
            vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, attn_implementation="eager")
ROTARY = {  # one rope of each kind: plain, scaled cos/sin (yarn's attention factor), partial rotary (half of head_dim)
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY)),
    "llama-yarn": lambda: LlamaForCausalLM(LlamaConfig(**TINY, rope_parameters={
        "rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0, "original_max_position_embeddings": 16})),
    "phi3-partial": lambda: Phi3ForCausalLM(Phi3Config(**TINY, partial_rotary_factor=0.5)),
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # notices raised inside HF peft / transformers 5, not by peftlab
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def _build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=VOCAB, n_positions=64,
                                           bos_token_id=0, eos_token_id=0, attn_implementation="eager"))
    else:
        model = ROTARY[kind]()
    return model.to(DEVICE).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, T), generator=g)
    mask = torch.ones_like(ids)
    ids[1, -2:], mask[1, -2:] = 0, 0  # the second row ends in two padding tokens
    return ids.to(DEVICE), mask.to(DEVICE)


def _logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits  # (B, T, V)


def _random_prefix(base, projection=False):
    """peftlab's prefix on a copy of ``base``, set to N(0, 1): far from anything the model would compute."""
    ours = inject(copy.deepcopy(base), PrefixConfig(num_virtual_tokens=M, projection=projection, projection_hidden=8,
                                                    init="random"), "p")
    with torch.no_grad():
        for p in ours.prefix_tuning["p"].parameters():
            p.normal_(generator=torch.Generator(p.device).manual_seed(2))
    return ours


def _keys_values(flat, layers=2, kv_heads=2):
    kv = flat.reshape(M, layers, 2, kv_heads, -1)  # (m, L, 2, K, hd)
    return kv[:, :, 0], kv[:, :, 1]


def _edit_record(folder, **changes):
    """Rewrite the folder's peftlab_adapter.json with ``changes`` (None removes a key)."""
    record = json.loads((folder / PEFTLAB_NAME).read_text())
    record.update(changes)
    (folder / PEFTLAB_NAME).write_text(json.dumps({k: v for k, v in record.items() if v is not None}))


# -- the rotation is the model's own ------------------------------------------------------------
@pytest.mark.parametrize("kind", list(ROTARY))
def test_turning_keys_by_s_positions_equals_reading_them_s_positions_later(kind):
    """Keys the model computes at 0..m-1, turned by +m, are the keys it computes at m..2m-1."""
    model = _build(kind)
    ids = torch.randint(1, VOCAB, (1, M), generator=torch.Generator().manual_seed(3))

    def flat_at(start):  # (m, L * 2 * K * hd), the saved layout
        calls = record_attention(model, ids, torch.arange(start, start + M)[None])
        kv = torch.stack([torch.stack([k[0], v[0]]) for _, _, k, v in calls])  # (L, 2, K, m, hd)
        return kv.permute(3, 0, 1, 2, 4).reshape(M, -1)

    site = record_attention(model, ids)[0][0]  # the first attention module
    rope = _model_rope(model, site)
    assert not isinstance(rope, str), rope
    early, late = flat_at(0), flat_at(M)
    torch.testing.assert_close(_turn_keys(rope, early, 2, 2, +M), late, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_turn_keys(rope, late, 2, 2, -M), early, atol=1e-5, rtol=1e-5)


# -- peftlab -> HF peft -----------------------------------------------------------------------
@pytest.mark.parametrize("kind,projection", [("llama", False), ("llama", True), ("llama-yarn", False),
                                             ("phi3-partial", False)])
def test_saved_rotary_prefix_gives_hf_peft_the_same_logits_at_default_positions(tmp_path, kind, projection):
    from peft import PeftModel

    base = _build(kind)
    ours = _random_prefix(base, projection)
    ids, mask = _batch()
    save_adapter(ours, tmp_path / "a", "p")  # an MLP is folded on the way out
    assert json.loads((tmp_path / "a" / PEFTLAB_NAME).read_text())[POSITIONS] == FROM_M
    stored = load_file(str(tmp_path / "a" / WEIGHTS_NAME))[TENSOR]
    flat = ours.prefix_tuning["p"].flat().detach().cpu()
    assert stored.shape == flat.shape == (M, 2 * 2 * 2 * 8)  # (m, L * 2 * kv_heads * head_dim), peft's layout
    (keys, values), (raw_keys, raw_values) = _keys_values(stored), _keys_values(flat)
    assert torch.equal(values, raw_values) and (keys - raw_keys).abs().max() > 0.1  # only the keys are turned
    twin = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    theirs, mine = _logits(twin, ids, mask), _logits(ours, ids, mask)  # both with their default positions
    assert (theirs - mine).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "phi3-partial"])
def test_rotary_round_trip_through_peftlab_agrees_to_float32_rounding(tmp_path, kind):
    """+m on save, -m on load: values come back bit for bit, keys to float32 rounding (the file is float32)."""
    base = _build(kind)
    ours = _random_prefix(base)
    save_adapter(ours, tmp_path / "a", "p")
    back = load_adapter(copy.deepcopy(base), tmp_path / "a", "p")
    (keys, values), (want_keys, want_values) = (_keys_values(m.prefix_tuning["p"].prefix_keys_values.detach())
                                                for m in (back, ours))
    assert torch.equal(values, want_values)
    assert (keys - want_keys).abs().max() <= 4e-7  # N(0, 1) entries: a few float32 ulps
    ids, mask = _batch()
    assert (_logits(back, ids, mask) - _logits(ours, ids, mask)).abs().max() <= 1e-6


def test_rotary_prefix_with_modules_to_save_is_stored_as_is_and_round_trips_exactly(tmp_path):
    """A "peftlab-prefix" folder (HF peft cannot read it) keeps peftlab's numbering: nothing to convert."""
    base = _build("llama")
    ours = inject(copy.deepcopy(base), PrefixConfig(num_virtual_tokens=M, projection=False, init="random",
                                                    modules_to_save=("lm_head",)), "p")
    save_adapter(ours, tmp_path / "a", "p")
    assert json.loads((tmp_path / "a" / PEFTLAB_NAME).read_text())[POSITIONS] == FROM_0
    assert torch.equal(load_file(str(tmp_path / "a" / WEIGHTS_NAME))[TENSOR],
                       ours.prefix_tuning["p"].prefix_keys_values.detach().cpu())
    back = load_adapter(copy.deepcopy(base), tmp_path / "a", "p")
    ids, mask = _batch()
    torch.testing.assert_close(_logits(back, ids, mask), _logits(ours, ids, mask), atol=0, rtol=0)


def test_old_files_without_a_positions_record_load_as_before(tmp_path):
    """Written before the conversion: the prefix as trained, no "input_positions" in peftlab_adapter.json."""
    from peft import PeftModel

    base = _build("llama")
    ours = _random_prefix(base)
    save_adapter(ours, tmp_path / "old", "p")
    flat = ours.prefix_tuning["p"].prefix_keys_values.detach().cpu().contiguous()
    save_file({TENSOR: flat}, str(tmp_path / "old" / WEIGHTS_NAME), metadata={"format": "pt"})
    _edit_record(tmp_path / "old", **{POSITIONS: None})
    ids, mask = _batch()
    want = _logits(ours, ids, mask)
    back = load_adapter(copy.deepcopy(base), tmp_path / "old", "p")
    torch.testing.assert_close(_logits(back, ids, mask), want, atol=0, rtol=0)  # read as peftlab's 0..T-1
    twin = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "old").eval()
    assert (_logits(twin, ids, mask) - want).abs().max() > 1e-2  # the bug such a file still shows in HF peft
    shifted = torch.arange(M, M + T, device=DEVICE).expand_as(ids)  # ... and the old workaround
    assert (_logits(twin, ids, mask) - _logits(ours, ids, mask, position_ids=shifted)).abs().max() <= 1e-5


def test_unknown_positions_record_is_refused_before_the_model_changes(tmp_path):
    base = _build("llama")
    save_adapter(_random_prefix(base), tmp_path / "a", "p")
    _edit_record(tmp_path / "a", **{POSITIONS: "from_7"})
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="input_positions='from_7'"):
        load_adapter(model, tmp_path / "a", "p")
    assert not hasattr(model, "prefix_tuning") and model.config._attn_implementation == "eager"


# -- HF peft -> peftlab -----------------------------------------------------------------------
def _peft_made(base, folder):
    """An HF peft prefix (random prompt_embeddings) saved with save_pretrained; returns the peft model."""
    from peft import PrefixTuningConfig, get_peft_model

    hf = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=M)).eval()
    with torch.no_grad():
        hf.prompt_encoder["default"].embedding.weight.normal_(generator=torch.Generator(DEVICE).manual_seed(4))
    hf.save_pretrained(folder)
    assert not (folder / PEFTLAB_NAME).exists()
    return hf


@pytest.mark.parametrize("kind", ["llama", "phi3-partial"])
def test_hf_peft_prefix_loads_into_peftlab_with_the_same_logits(tmp_path, kind):
    base = _build(kind)
    hf = _peft_made(base, tmp_path / "hf")
    ids, mask = _batch()
    ours = load_adapter(copy.deepcopy(base), tmp_path / "hf", "p")
    theirs = _logits(hf, ids, mask)
    assert (_logits(ours, ids, mask) - theirs).abs().max() <= 1e-5
    save_adapter(ours, tmp_path / "again", "p")  # and back: peftlab writes what HF peft wrote
    torch.testing.assert_close(load_file(str(tmp_path / "again" / WEIGHTS_NAME))[TENSOR],
                               load_file(str(tmp_path / "hf" / WEIGHTS_NAME))[TENSOR], atol=4e-7, rtol=0)


# -- absolute positions: no conversion, a clear warning -----------------------------------------
def test_gpt2_prefix_cannot_be_converted_and_the_warnings_say_what_to_pass(tmp_path):
    from peft import PeftModel

    base = _build("gpt2")
    ours = _random_prefix(base)
    with pytest.warns(UserWarning, match=r"learned absolute.*position_ids=torch\.arange\(-5, T - 5\)") as seen:
        save_adapter(ours, tmp_path / "a", "p")
    assert seen[0].filename == __file__  # points at the caller's save_adapter line
    assert json.loads((tmp_path / "a" / PEFTLAB_NAME).read_text())[POSITIONS] == FROM_0
    assert torch.equal(load_file(str(tmp_path / "a" / WEIGHTS_NAME))[TENSOR],
                       ours.prefix_tuning["p"].prefix_keys_values.detach().cpu())  # stored as trained
    ids, mask = _batch()
    mine = _logits(ours, ids, mask)
    twin = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    assert (_logits(twin, ids, mask) - mine).abs().max() > 1e-2  # HF peft's default: the input at m..m+T-1
    advised = torch.arange(-M, T - M, device=DEVICE).expand_as(ids)  # HF peft adds m: 0..T-1
    assert (_logits(twin, ids, mask, position_ids=advised) - mine).abs().max() <= 1e-5

    hf = _peft_made(base, tmp_path / "hf")  # the other way: peftlab must number the input from m
    with pytest.warns(UserWarning, match=r"position_ids=torch\.arange\(5, 5 \+ T\)"):
        back = load_adapter(copy.deepcopy(base), tmp_path / "hf", "p")
    shifted = torch.arange(M, M + T, device=DEVICE).expand_as(ids)
    assert (_logits(back, ids, mask, position_ids=shifted) - _logits(hf, ids, mask)).abs().max() <= 1e-5


def test_rotary_model_peftlab_does_not_mirror_is_saved_as_is_with_the_warning(tmp_path):
    base = _build("llama")
    ours = _random_prefix(base)
    ours.model.second_rope = LlamaRotaryEmbedding(ours.config)  # two rotary modules: which one a layer uses is unknown
    with pytest.warns(UserWarning, match="rotary embedding is not the kind peftlab mirrors"):
        save_adapter(ours, tmp_path / "a", "p")
    assert json.loads((tmp_path / "a" / PEFTLAB_NAME).read_text())[POSITIONS] == FROM_0
    back = load_adapter(copy.deepcopy(base), tmp_path / "a", "p")
    ids, mask = _batch()
    torch.testing.assert_close(_logits(back, ids, mask), _logits(ours, ids, mask), atol=0, rtol=0)
