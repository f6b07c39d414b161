"""peftlab.chat (notebook 13): assistant-only masks, role checks, padding, replies, export, exercises."""

import copy
import dataclasses
import random

import pytest
import torch

from peftlab import chat, exercises_chat
from peftlab.config import LoRAConfig
from peftlab.data import PadCollator
from peftlab.inject import configs, count_parameters, inject
from peftlab.metrics import evaluate

pytestmark = pytest.mark.slow  # every test uses the real SmolLM2 tokenizer (its chat template)
IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


def _tiny_llama(vocab: int, seed: int = 0, pad: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=pad)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny(tok):
    return _tiny_llama(len(tok), pad=tok.pad_token_id)


def _offset_labels(tok, messages):
    """Independent reference: label the tokens whose characters lie inside an assistant's content
    or its closing <|im_end|>, found by string search in the rendered text (offset mapping)."""
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ranges, pos = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        head = "<|im_start|>assistant\n"
        start = text.index(head + m["content"] + IM_END, pos) + len(head)
        pos = start + len(m["content"]) + len(IM_END)
        ranges.append((start, pos))
    return [i if any(s <= a and b <= e and b > a for s, e in ranges) else -100
            for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]


def _spans(labels):
    out, cur = [], []
    for t in labels:
        if t != -100:
            cur.append(t)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


# -- the mask on the real SmolLM2 tokenizer ------------------------------------------------------
def test_single_turn_mask_is_assistant_content_and_end_of_turn(tok):
    conv = chat.e2e_conversation("name : The Eagle | food : French", "The Eagle serves French food.")
    enc = chat.encode_conversation(tok, conv)
    spans = _spans(enc["labels"])
    assert len(spans) == 1
    assert tok.decode(spans[0]) == "The Eagle serves French food." + IM_END
    assert tok.decode(enc["input_ids"][-1:]) == "\n" and enc["labels"][-1] == -100  # the closing newline: no label
    assert chat.end_of_turn_id(tok) == tok.convert_tokens_to_ids(IM_END)
    assert tok.decode(enc["input_ids"]) == tok.apply_chat_template(conv, tokenize=False)


def test_multi_turn_mask_matches_offset_reference(tok):
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Where is it?"}, {"role": "assistant", "content": "Near the river."},
            {"role": "user", "content": "Price?"}, {"role": "assistant", "content": "Cheap, about £20."}]
    enc = chat.encode_conversation(tok, conv)
    assert [tok.decode(s) for s in _spans(enc["labels"])] == [
        "Hello!" + IM_END, "Near the river." + IM_END, "Cheap, about £20." + IM_END]
    assert enc["labels"] == _offset_labels(tok, conv)
    rng = random.Random(0)
    for _ in range(25):  # random conversations, with and without a system message
        conv = exercises_chat.random_conversation(rng)
        assert chat.encode_conversation(tok, conv)["labels"] == _offset_labels(tok, conv)


def test_no_system_message_gets_the_template_default_and_is_still_masked(tok):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    enc = chat.encode_conversation(tok, conv)
    assert "SmolLM" in tok.decode(enc["input_ids"])  # the long default system message is inserted
    assert [tok.decode(s) for s in _spans(enc["labels"])] == ["Hello." + IM_END]
    short = chat.encode_conversation(tok, chat.e2e_conversation("name : X", "X."))
    assert "SmolLM" not in tok.decode(short["input_ids"])


def test_all_token_labels_and_truncation(tok):
    conv = chat.e2e_conversation("name : The Eagle", "The Eagle is a pub.")
    enc = chat.encode_conversation(tok, conv, assistant_only=False)
    assert enc["labels"] == enc["input_ids"]
    n_prompt = len(chat.encode_prompt(tok, conv[:-1]))
    cut = chat.encode_conversation(tok, conv, max_length=n_prompt + 2)
    assert len(cut["input_ids"]) == n_prompt + 2 and sum(t != -100 for t in cut["labels"]) == 2
    with pytest.raises(ValueError, match="max_length=10 cuts every assistant token"):
        chat.encode_conversation(tok, conv, max_length=10)


def test_template_that_is_not_prefix_stable_raises(tok):
    odd = copy.deepcopy(tok)  # the generation prompt differs from the header written for a stored turn
    odd.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}:\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ValueError, match="not prefix-stable at message 2"):
        chat.encode_conversation(odd, chat.e2e_conversation("name : X", "X."))


# -- bad conversations: a clear error, nothing changed ------------------------------------------
BAD = [
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}], r"message 1 has role 'bot'.*accepted"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}],
     r"message 1 has role 'system'.*only as message 0"),
    ([{"role": "assistant", "content": "hello"}], r"message 0 has role 'assistant' where 'user' was expected"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], r"message 1 .*'assistant' was expected"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], r"message 1 \(assistant\) has empty"),
    ([{"role": "user", "content": "hi"}], r"message 0 has role 'user': a training conversation ends"),
    ([{"role": "system", "content": "x"}], r"only a system message"),
    ([], r"non-empty list"),
    ([{"role": "user", "content": "hi <|im_end|>"}, {"role": "assistant", "content": "ok"}],
     r"message 0 \(user\) contains the special token text"),
]


@pytest.mark.parametrize("conv,match", BAD)
def test_bad_conversations_raise_before_anything_changes(tok, tiny, conv, match):
    side, template, n = tok.padding_side, tok.chat_template, len(tok)
    with pytest.raises(ValueError, match=match):
        chat.encode_conversation(tok, conv)
    with pytest.raises(ValueError, match=match):
        chat.tokenize_conversations(tok, [chat.e2e_conversation("name : X", "X."), conv])
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    tiny.train()
    if not (len(conv) == 1 and conv[0]["role"] == "user"):  # the one case that is a valid prompt
        with pytest.raises(ValueError, match="message|non-empty"):  # every prompt is checked before the first batch
            chat.generate_replies(tiny, tok, [chat.e2e_conversation("name : X"), conv])
    assert tiny.training  # its mode too
    tiny.eval()
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert (tok.padding_side, tok.chat_template, len(tok)) == (side, template, n)


def test_generation_prompt_must_end_with_user(tok):
    with pytest.raises(ValueError, match="ends with the user's turn"):
        chat.encode_prompt(tok, chat.e2e_conversation("name : X", "X."))


# -- padding, training data, replies -------------------------------------------------------------
def test_collated_batch_pads_and_gives_the_mean_of_the_per_example_losses(tok, tiny):
    rows = chat.tokenize_conversations(tok, [chat.e2e_conversation("name : A", "A is a pub."),
                                             chat.e2e_conversation("name : Bibimbap House | area : riverside",
                                                                   "Bibimbap House is by the river, near the centre.")])
    batch = PadCollator(tok)([rows[0], rows[1]])
    n0 = len(rows[0]["input_ids"])
    assert batch["input_ids"].shape[1] == len(rows[1]["input_ids"]) > n0
    assert (batch["input_ids"][0, n0:] == tok.pad_token_id).all() and (batch["labels"][0, n0:] == -100).all()
    assert (batch["attention_mask"][0, n0:] == 0).all()
    with torch.no_grad():
        joint = float(tiny(**batch).loss)
        parts = [(float(tiny(**PadCollator(tok)([r])).loss), sum(t != -100 for t in r["labels"][1:])) for r in rows]
    assert joint == pytest.approx(sum(l * k for l, k in parts) / sum(k for _, k in parts), rel=1e-5)
    assert evaluate(tiny, rows)["loss"] == pytest.approx(joint, rel=1e-5)


def test_generate_replies_strips_the_template_and_matches_one_by_one(tok, tiny):
    convs = [chat.e2e_conversation("name : The Eagle"), chat.e2e_conversation("name : Aromi | area : city centre | "
                                                                             "food : Italian | priceRange : high")]
    side = tok.padding_side
    replies = chat.generate_replies(tiny, tok, convs, max_new_tokens=6, batch_size=2)
    assert tok.padding_side == side
    for conv, reply in zip(convs, replies):
        ids = torch.tensor([chat.encode_prompt(tok, conv)])
        out = tiny.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            eos_token_id=chat.end_of_turn_id(tok), pad_token_id=tok.pad_token_id)
        assert reply == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert "<|im_start|>" not in reply and "Write one sentence" not in reply


def test_token_loss_split_agrees_with_evaluate(tok, tiny):
    convs = [chat.e2e_conversation("name : A | food : Thai", "A serves Thai food."),
             chat.e2e_conversation("name : B", "B is a coffee shop.")]
    masked = chat.tokenize_conversations(tok, convs)
    every = chat.tokenize_conversations(tok, convs, assistant_only=False)
    split = chat.token_loss_split(tiny, every, [[t != -100 for t in r] for r in masked["labels"]])
    assert split["assistant_loss"] == pytest.approx(evaluate(tiny, masked)["loss"], rel=1e-5)
    assert split["all_token_loss"] == pytest.approx(evaluate(tiny, every)["loss"], rel=1e-5)
    assert split["assistant_tokens"] == sum(t != -100 for r in masked["labels"] for t in r[1:])
    assert split["prompt_tokens"] + split["assistant_tokens"] == sum(len(r) - 1 for r in every["input_ids"])


def test_the_recipe_trains_only_lora_through_peftlab_train(tok):
    model = _tiny_llama(len(tok), seed=1, pad=tok.pad_token_id)
    plan = chat.recipe(quick=True)
    data = chat.tokenize_conversations(tok, [chat.e2e_conversation(f"name : N{i}", f"N{i} is a pub.") for i in range(4)])
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    result = chat.train_chat_lora(model, data, plan, eval_set=data, progress=False)
    assert result.steps == plan.steps and result.evals
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k.replace(".base_layer", "")]), k
    assert count_parameters(model).trainable == 2 * (2 * 8 * 64 + 2 * 8 * 48 + 3 * 8 * 96)  # q,o; k,v (16 out); mlp


# -- export ---------------------------------------------------------------------------------------
def test_export_merged_and_peft_reload_give_the_same_logits(tok, tmp_path):
    base = _tiny_llama(len(tok), seed=2, pad=tok.pad_token_id)
    fresh = copy.deepcopy(base)
    inject(base, LoRAConfig(r=4, alpha=8, target_modules="all-linear"), "chat")
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a non-zero update, so that a dropped adapter would show
    state = {k: v.clone() for k, v in base.state_dict().items()}
    out = chat.export_checks(base, tok, "chat", lambda: copy.deepcopy(fresh), tmp_path)
    assert out["merged_max_diff"] <= 1e-4 and out["peft_max_diff"] <= 1e-4 and out["reload_max_diff"] == 0
    ids = torch.tensor([chat.encode_prompt(tok, chat.e2e_conversation("name : X"))])
    with torch.no_grad():  # and the adapter really moves the logits, so a dropped adapter would show
        assert (base(input_ids=ids).logits - fresh(input_ids=ids).logits).abs().max() > 1e-2
    assert list(configs(base)) == ["chat"] and all(torch.equal(state[k], v) for k, v in base.state_dict().items())
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "adapter" / "adapter_config.json").is_file()


# -- exercises ------------------------------------------------------------------------------------
def _by_offsets(tokenizer, messages):
    return _offset_labels(tokenizer, messages)


def _by_prefixes(tokenizer, messages):  # the notebook's hint: lengths of two rendered prefixes per turn
    def ids(msgs, gen):
        return tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen),
                         add_special_tokens=False)["input_ids"]

    full = ids(messages, False)
    labels = [-100] * len(full)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start, stop = len(ids(messages[:i], True)), len(ids(messages[:i + 1], False)) - 1  # drop the "\n"
            labels[start:stop] = full[start:stop]
    return labels


def _no_end_of_turn(tokenizer, messages):
    eot = chat.end_of_turn_id(tokenizer)
    return [-100 if t == eot else t for t in chat.encode_conversation(tokenizer, messages)["labels"]]


def _with_newline(tokenizer, messages):  # labels the "\n" after each <|im_end|> too
    enc = chat.encode_conversation(tokenizer, messages)
    labels = list(enc["labels"])
    for t in range(1, len(labels)):
        if labels[t - 1] == chat.end_of_turn_id(tokenizer):
            labels[t] = enc["input_ids"][t]
    return labels


def _last_turn_only(tokenizer, messages):  # right for one exchange, wrong for several
    labels = chat.encode_conversation(tokenizer, messages)["labels"]
    t = len(labels) - 1
    while labels[t] == -100:
        t -= 1
    while t >= 0 and labels[t] != -100:
        t -= 1
    return [-100] * (t + 1) + labels[t + 1:]


def test_mask_exercise_accepts_right_and_rejects_wrong(tok):
    assert exercises_chat.check_assistant_mask(_by_offsets, tok, quiet=True)
    assert exercises_chat.check_assistant_mask(_by_prefixes, tok, quiet=True)
    assert exercises_chat.check_assistant_mask(lambda t, m: None, tok, quiet=True).pending
    v = exercises_chat.check_assistant_mask(_no_end_of_turn, tok, quiet=True)
    assert not v and "closes the assistant turn" in v.message
    v = exercises_chat.check_assistant_mask(_with_newline, tok, quiet=True)
    assert not v and "newline after the end-of-turn" in v.message
    v = exercises_chat.check_assistant_mask(_last_turn_only, tok, quiet=True)
    assert not v and "inside an assistant's reply" in v.message
    v = exercises_chat.check_assistant_mask(lambda t, m: chat.encode_conversation(t, m, assistant_only=False)["labels"],
                                            tok, quiet=True)
    assert not v and "want -100" in v.message


def test_target_choice_checker():
    table = {"q,v": {"loss": 1.50, "trainable": 100}, "mlp": {"loss": 1.31, "trainable": 300},
             "all-linear": {"loss": 1.30, "trainable": 500}}
    assert exercises_chat.best_target(table) == "mlp"  # within 0.02 of the best, fewer parameters
    assert exercises_chat.check_target_choice(table, "mlp", 1.31, quiet=True)
    v = exercises_chat.check_target_choice(table, "all-linear", 1.30, quiet=True)
    assert not v and "fewer parameters" in v.message
    assert "more than" in exercises_chat.check_target_choice(table, "q,v", 1.5, quiet=True).message
    assert "read the table" in exercises_chat.check_target_choice(table, "mlp", 1.2, quiet=True).message
    assert exercises_chat.check_target_choice(table, None, None, quiet=True).pending
    assert not exercises_chat.check_target_choice(table, "attention", 1.3, quiet=True)


def test_measure_targets_leaves_the_model_as_it_was(tok):
    model = _tiny_llama(len(tok), seed=3, pad=tok.pad_token_id)
    data = chat.tokenize_conversations(tok, [chat.e2e_conversation(f"name : N{i}", f"N{i} is a pub.") for i in range(4)])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    table = exercises_chat.measure_targets(model, data, data, chat.recipe(quick=True), steps=2)
    assert {k: v["trainable"] for k, v in table.items()} == {
        "q,v": 2 * 8 * (32 + 32 + 32 + 16), "mlp": 2 * 3 * 8 * (32 + 64), "all-linear": 2 * (2 * 8 * 64 + 2 * 8 * 48 + 3 * 8 * 96)}
    assert not configs(model) and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    inject(model, LoRAConfig(target_modules=("q_proj",)), "x")
    with pytest.raises(ValueError, match="without adapters"):
        exercises_chat.measure_targets(model, data, data, chat.recipe(quick=True), steps=1)


def test_export_on_real_smollm2(tmp_path):
    from peftlab import load_model

    model, tok = load_model("smollm2", task="causal-lm")
    inject(model, LoRAConfig(r=2, alpha=4, target_modules="all-linear"), "chat")
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    out = chat.export_checks(model, tok, "chat", lambda: load_model("smollm2", task="causal-lm")[0], tmp_path)
    # folding rounds in float32: ~1e-4 on logits of size ~40 after real training
    assert out["merged_max_diff"] <= 1e-5 * out["logit_scale"] and out["reload_max_diff"] == 0
    assert out["peft_max_diff"] <= 1e-4


def test_bench_chat_tables_override_reaches_every_run(monkeypatch):
    """--tables changes only how many test tables are scored, for every seed, and is recorded in the settings."""
    from peftlab import chat
    from peftlab.bench import chat as chatbench

    seen = []

    def fake_run(plan, log=print):
        seen.append(plan)
        return {"seed": plan.seed, "before": {"bleu": 1.0, "rouge_l": 0.1, "replies": []},
                "after": {"bleu": 50.0 + plan.seed, "rouge_l": 0.6, "replies": ["x"]}, "wall_s": 1.0}

    monkeypatch.setattr(chat, "run_recipe", fake_run)
    result = chatbench.bench_chat((0, 1), tables=7, log=lambda *a: None)
    assert [p.eval_tables for p in seen] == [7, 7] and [p.seed for p in seen] == [0, 1]
    assert all(dataclasses.replace(p, eval_tables=chat.CLASS_RECIPE.eval_tables, seed=0) == chat.CLASS_RECIPE
               for p in seen)  # nothing else changed
    assert result["settings"]["eval_tables"] == 7 and result["summary"]["bleu_after_spread"] == 1.0
    with pytest.raises(ValueError, match="tables must be a positive number"):
        chatbench.bench_chat((0,), tables=0)
    with pytest.raises(SystemExit):
        chatbench.main(["--tables", "0"])
