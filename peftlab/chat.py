"""Instruction tuning in chat format: conversations, assistant-only loss masks, replies, export.

Most people who fine-tune a chat model with PEFT do the same four things, and this module does each
once, for ``notebooks/13_capstone_instruction_tuning.ipynb`` and ``python -m peftlab.bench.chat``:

* **Conversations.** E2E NLG tables (Novikova et al., 2017) become system / user / assistant turns
  (``e2e_conversation``) rendered by the model's own chat template. SmolLM2's template inserts a
  long default system message when a conversation has none, so ours always carries a short one.
* **Loss on the assistant only** (the recipe of InstructGPT, Ouyang et al., 2022, and of most SFT
  code). ``encode_conversation`` renders every prefix of the conversation that ends where an
  assistant turn starts or stops, tokenises each, checks that it is a prefix of the whole
  conversation's tokens (else the template is not prefix-stable and a span would be wrong, so it
  raises), and labels exactly the assistant's content and the token that closes its turn
  (``<|im_end|>`` for SmolLM2); everything else is -100. Multi-turn conversations get one span per
  assistant turn.
* **Replies.** ``generate_replies`` renders the prompt with ``add_generation_prompt=True``, pads on
  the left (without touching the tokenizer), decodes greedily with the KV cache and stops at the
  end-of-turn token; ``score_replies`` is corpus BLEU / ROUGE-L against every reference of a table.
* **The class recipe.** ``ChatRecipe`` and ``train_chat_lora`` / ``score_model`` are the one
  training-and-scoring path that the notebook and the bench both call, so they cannot drift.
  ``export_checks`` saves the merged model with ``save_pretrained`` and the adapter in peft's
  format, reloads both with plain transformers / HF peft and measures the logit difference.

Roles are checked before anything is tokenised (``validate_conversation``): an optional system
message first, then user and assistant alternating, starting with the user.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["SYSTEM_PROMPT", "ROLES", "validate_conversation", "e2e_conversation", "e2e_conversations",
           "end_of_turn_id", "encode_conversation", "encode_prompt", "tokenize_conversations",
           "generate_replies", "score_replies", "ChatRecipe", "CLASS_RECIPE", "QUICK_RECIPE", "recipe",
           "chat_splits", "train_chat_lora", "score_model", "token_loss_split", "export_checks",
           "run_recipe"]

SYSTEM_PROMPT = "You describe restaurants in one sentence."
ROLES = ("system", "user", "assistant")
E2E_REQUEST = "Write one sentence about this restaurant: {table}"


# --- conversations ----------------------------------------------------------------------------

def validate_conversation(messages, *, for_training: bool = True) -> None:
    """Raise ``ValueError`` unless ``messages`` is a conversation this module can encode.

    Accepted: a list of ``{"role", "content"}`` dicts with non-empty string content; an optional
    ``system`` message at index 0 only; then ``user`` and ``assistant`` alternating, starting with
    ``user``. For training the last message is the assistant's (there is something to learn); for
    generation (``for_training=False``) it is the user's (the model writes the next turn).
    """
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"a conversation is a non-empty list of {{'role': ..., 'content': ...}} dicts, got "
                         f"{type(messages).__name__}{'' if messages else ' (empty)'}")
    start = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i} is {msg!r}: each message must be a dict with 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}: accepted roles are {ROLES} (system only first)")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"message {i} ({role}) has empty or non-string content {content!r}: "
                             "every turn needs some text")
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i} has role 'system': a system message is accepted only as "
                                 "message 0; move it to the front or merge it into the first one")
            start = 1
            continue
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if role != want:
            raise ValueError(f"message {i} has role {role!r} where {want!r} was expected: after the optional "
                             "system message the turns alternate user, assistant, user, ...")
    if len(messages) == start:
        raise ValueError("the conversation holds only a system message: add a user turn")
    last = messages[-1]["role"]
    if for_training and last != "assistant":
        raise ValueError(f"message {len(messages) - 1} has role {last!r}: a training conversation ends with "
                         "the assistant's reply (there is nothing to learn otherwise)")
    if not for_training and last != "user":
        raise ValueError(f"message {len(messages) - 1} has role {last!r}: a prompt for generation ends with "
                         "the user's turn; drop the assistant's reply (messages[:-1])")


def e2e_conversation(table: str, text: str | None = None, system: str = SYSTEM_PROMPT) -> list[dict]:
    """System, user (the table, asked for as a sentence) and, when ``text`` is given, assistant."""
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": E2E_REQUEST.format(table=table)}]
    if text is not None:
        messages.append({"role": "assistant", "content": text})
    return messages


def e2e_conversations(dataset, system: str = SYSTEM_PROMPT) -> list[list[dict]]:
    """One training conversation per (table, sentence) row of a ``load_e2e`` split."""
    return [e2e_conversation(t, s, system) for t, s in zip(list(dataset["table"]), list(dataset["text"]))]


# --- tokenising with the template -------------------------------------------------------------

def _render(tokenizer, messages, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _check_special_text(tokenizer, messages) -> None:
    """Content that spells a special token (e.g. ``<|im_end|>``) would forge turn boundaries."""
    specials = [t for t in tokenizer.all_special_tokens if t]
    for i, msg in enumerate(messages):
        hit = next((t for t in specials if t in msg["content"]), None)
        if hit is not None:
            raise ValueError(f"message {i} ({msg['role']}) contains the special token text {hit!r}, which the "
                             "tokenizer would read as a turn marker: remove it from the content")


def end_of_turn_id(tokenizer) -> int:
    """The id of the token that closes a turn: the first special token the template writes after
    an assistant's content (``<|im_end|>`` for SmolLM2)."""
    probe = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    head = _render(tokenizer, probe[:1], True)
    full = _render(tokenizer, probe, False)
    special = set(tokenizer.all_special_ids)
    found = next((t for t in full[len(head):] if t in special), None)
    if found is None:
        raise ValueError("the chat template closes an assistant turn without a special token: the end of a "
                         "reply cannot be learned or detected; use a template with an end-of-turn token")
    return int(found)


def _assistant_spans(tokenizer, messages, full: list[int], eot: int) -> list[tuple[int, int]]:
    """[start, stop) token spans of each assistant turn's content plus its end-of-turn token."""
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)  # everything up to "<|im_start|>assistant\n"
        through = _render(tokenizer, messages[:i + 1], False)  # ... up to this turn's closing "\n"
        for what, ids in (("the prompt before", before), ("the conversation through", through)):
            if full[:len(ids)] != ids:
                raise ValueError(f"the chat template is not prefix-stable at message {i} (assistant): the tokens "
                                 f"of {what} this turn are not a prefix of the whole conversation's tokens, so "
                                 "the turn's span cannot be located (does the content start with whitespace?)")
        turn = full[len(before):len(through)]
        if eot not in turn:
            raise ValueError(f"message {i} (assistant): no end-of-turn token (id {eot}) after its content")
        spans.append((len(before), len(before) + turn.index(eot) + 1))
    return spans


def encode_conversation(tokenizer, messages, max_length: int | None = None, *,
                        assistant_only: bool = True) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` (lists) of one training conversation.

    ``labels`` equal ``input_ids`` on every assistant turn's content and its end-of-turn token and
    are -100 elsewhere (system, user, role headers, the newline after a turn). With
    ``assistant_only=False`` every token is a label (the no-mask contrast of notebook 13). Sequences
    longer than ``max_length`` are cut; a conversation left without any label raises ``ValueError``.
    """
    validate_conversation(messages, for_training=True)
    _check_special_text(tokenizer, messages)
    full = _render(tokenizer, messages, False)
    labels = [-100] * len(full)
    for start, stop in _assistant_spans(tokenizer, messages, full, end_of_turn_id(tokenizer)):
        labels[start:stop] = full[start:stop]
    if not assistant_only:
        labels = list(full)
    if max_length is not None:
        full, labels = full[:max_length], labels[:max_length]
    if all(t == -100 for t in labels):
        raise ValueError(f"max_length={max_length} cuts every assistant token of a {len(labels)}+ token "
                         "conversation: raise max_length")
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}


def encode_prompt(tokenizer, messages) -> list[int]:
    """Token ids of a conversation that ends with the user, plus the assistant's header."""
    validate_conversation(messages, for_training=False)
    _check_special_text(tokenizer, messages)
    return _render(tokenizer, messages, True)


def tokenize_conversations(tokenizer, conversations, max_length: int | None = 256, *,
                           assistant_only: bool = True):
    """A ``datasets.Dataset`` of encoded conversations, ready for ``peftlab.train`` / ``evaluate``
    (their loaders pad ``input_ids`` with the pad id, ``labels`` with -100: ``data.PadCollator``).
    Every conversation is validated first, so a bad one fails before anything is built."""
    from datasets import Dataset

    conversations = list(conversations)
    if not conversations:
        raise ValueError("no conversations given: pass at least one")
    rows = [encode_conversation(tokenizer, c, max_length, assistant_only=assistant_only) for c in conversations]
    return Dataset.from_dict({k: [r[k] for r in rows] for k in ("input_ids", "attention_mask", "labels")})


# --- replies and their scores -----------------------------------------------------------------

@torch.inference_mode()
def generate_replies(model, tokenizer, conversations, max_new_tokens: int = 48, batch_size: int = 16, *,
                     autocast_dtype: torch.dtype | None = None) -> list[str]:
    """The model's greedy reply to each conversation (each ends with a user turn), template removed.

    Prompts are sorted by length and left-padded per batch (``data.PadCollator``; the tokenizer's own
    ``padding_side`` is not touched), decoded with the KV cache until the end-of-turn token, and
    only the new tokens are decoded, without special tokens. Replies come back in input order.
    """
    from transformers import GenerationConfig

    from peftlab.data import PadCollator

    prompts = [encode_prompt(tokenizer, c) for c in conversations]  # validates every one first
    eot, pad = end_of_turn_id(tokenizer), tokenizer.pad_token_id
    collate = PadCollator(tokenizer, side="left")
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                           eos_token_id=eot, pad_token_id=pad)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            batch = collate([{"input_ids": prompts[i], "attention_mask": [1] * len(prompts[i])} for i in idx])
            batch = {k: v.to(device) for k, v in batch.items()}  # (B, T) each
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model.generate(**batch, generation_config=gen)  # (B, T + new)
            new = out[:, batch["input_ids"].shape[1]:]
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                replies[i] = text.strip()
    finally:
        model.train(was_training)
    return replies


def score_replies(replies: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU (0-100) and mean ROUGE-L F (0-1), every reference of a table counting."""
    from peftlab.metrics import bleu, rouge_l

    return {"bleu": bleu(replies, references), "rouge_l": rouge_l(replies, references)}


@torch.inference_mode()
def token_loss_split(model, dataset, assistant_mask: Sequence[Sequence[bool]]) -> dict[str, float]:
    """Summed and mean next-token loss on prompt vs assistant tokens of an all-token-labelled set.

    ``dataset`` is ``tokenize_conversations(..., assistant_only=False)``; ``assistant_mask[i][t]``
    says whether token t of row i is an assistant label (``labels != -100`` of the masked encoding).
    Shows how much of the unmasked loss the predictable template and prompt carry.
    """
    from peftlab.data import PadCollator
    from peftlab.metrics import _Pad

    collate = PadCollator(_Pad(model.config.pad_token_id or 0))
    was_training = model.training
    model.eval()
    sums, counts = {"prompt": 0.0, "assistant": 0.0}, {"prompt": 0, "assistant": 0}
    device = next(model.parameters()).device
    try:
        for b in range(0, len(dataset), 16):
            rows = [dataset[i] for i in range(b, min(b + 16, len(dataset)))]
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            target = batch["labels"][:, 1:]  # (B, T - 1): token t + 1 is predicted at t
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target.clamp(min=0),
                                                    reduction="none")  # (B, T - 1)
            for r, row_mask in enumerate(assistant_mask[b:b + len(rows)]):
                n = len(row_mask)
                is_asst = torch.tensor(row_mask[1:], dtype=torch.bool, device=device)  # (n - 1,)
                row = nll[r, :n - 1]
                sums["assistant"] += float(row[is_asst].sum())
                sums["prompt"] += float(row[~is_asst].sum())
                counts["assistant"] += int(is_asst.sum())
                counts["prompt"] += int((~is_asst).sum())
    finally:
        model.train(was_training)
    total = sums["prompt"] + sums["assistant"]
    return {"prompt_tokens": counts["prompt"], "assistant_tokens": counts["assistant"],
            "prompt_loss_share": sums["prompt"] / total, "all_token_loss": total / sum(counts.values()),
            "prompt_loss": sums["prompt"] / counts["prompt"], "assistant_loss": sums["assistant"] / counts["assistant"]}


# --- the class recipe (notebook 13 and peftlab.bench.chat) ------------------------------------

@dataclass(frozen=True)
class ChatRecipe:
    """One budget for the capstone run; notebook 13 and ``peftlab.bench.chat`` both use it."""

    steps: int = 48  # optimizer steps of LoRA training (1.6-1.9 s each at batch 8, bf16, 2-core CPU)
    batch_size: int = 8  # conversations per step
    lr: float = 2e-3  # constant after warm-up, so the first k steps equal a k-step run
    warmup: int = 3  # warm-up steps
    r: int = 8  # LoRA rank on every linear layer of every block
    alpha: float = 16
    target_modules: tuple[str, ...] | str = "all-linear"  # q, k, v, o, gate, up, down
    precision: str = "bf16"  # training autocast (1.6 vs 2.2 s per step in fp32 here); replies decode in fp32,
    # which is faster than bf16 for one token at a time on this CPU
    eval_tables: int = 40  # held-out test tables scored with BLEU / ROUGE-L
    val_rows: int = 32  # held-out conversations for the assistant-token loss
    new_tokens: int = 40  # longest reply generated
    max_length: int = 160  # tokens per training conversation (E2E ones have ~90)
    seed: int = 0

    def train_config(self, **overrides):
        from peftlab.train import TrainConfig

        return TrainConfig(**{**dict(lr=self.lr, batch_size=self.batch_size, max_steps=self.steps,
                                     warmup=self.warmup, schedule="constant", metric="loss",
                                     precision=self.precision, seed=self.seed, log_every=1,
                                     eval_batch_size=16), **overrides})  # (16, T, 49152) logits: ~0.3 GB

    def lora_config(self, target_modules=None):
        from peftlab.config import LoRAConfig

        return LoRAConfig(r=self.r, alpha=self.alpha, target_modules=target_modules or self.target_modules)


CLASS_RECIPE = ChatRecipe()
QUICK_RECIPE = ChatRecipe(steps=2, batch_size=2, warmup=1, eval_tables=4, val_rows=8, new_tokens=12)


def recipe(quick: bool, seed: int = 0) -> ChatRecipe:
    """The class-mode recipe, or the quick (CI) one, for ``seed``."""
    return dataclasses.replace(QUICK_RECIPE if quick else CLASS_RECIPE, seed=seed)


def chat_splits(tokenizer, plan: ChatRecipe, e2e=None) -> dict:
    """The data of one run: training and validation conversations (tokenised, assistant-only labels),
    the same training set labelled on every token, and the held-out test tables with their references."""
    from peftlab.data import group_references, load_e2e

    e2e = e2e if e2e is not None else load_e2e(seed=0)  # the split is fixed; the seed picks rows
    n = plan.steps * plan.batch_size
    train_rows = e2e["train"].shuffle(seed=plan.seed).select(range(n))
    val_rows = e2e["validation"].select(range(min(plan.val_rows, len(e2e["validation"]))))
    tables, refs = group_references(e2e["test"])
    convs = e2e_conversations(train_rows)
    return {"train_conversations": convs,
            "train": tokenize_conversations(tokenizer, convs, plan.max_length),
            "train_all_tokens": tokenize_conversations(tokenizer, convs, plan.max_length, assistant_only=False),
            "validation": tokenize_conversations(tokenizer, e2e_conversations(val_rows), plan.max_length),
            "tables": tables[:plan.eval_tables], "references": refs[:plan.eval_tables]}


def score_model(model, tokenizer, tables, references, plan: ChatRecipe) -> dict:
    """Replies to the held-out tables, their BLEU / ROUGE-L and the seconds it took."""
    start = time.perf_counter()
    replies = generate_replies(model, tokenizer, [e2e_conversation(t) for t in tables], plan.new_tokens)
    return {"replies": replies, **score_replies(replies, references), "seconds": time.perf_counter() - start}


def train_chat_lora(model, train_set, plan: ChatRecipe, *, eval_set=None, name: str = "chat",
                    target_modules=None, steps: int | None = None, progress: bool = True, eval_every=None):
    """Inject a seeded LoRA adapter ``name`` (``plan``'s targets unless given) and train it with
    ``peftlab.train``; returns the ``TrainResult``. The adapter's start depends only on ``plan.seed``."""
    from peftlab.inject import inject
    from peftlab.train import train

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)  # LoRA's A matrices: the same start for every run of this seed
        inject(model, plan.lora_config(target_modules), name)
    config = plan.train_config(progress=progress, eval_every=eval_every,
                               **({"max_steps": steps} if steps is not None else {}))
    return train(model, train_set, eval_set, config)


def export_checks(model, tokenizer, name: str, fresh_base: Callable[[], torch.nn.Module],
                  directory: str | Path | None = None, probe_conversations=None) -> dict:
    """Save and reload the adapted ``model`` two ways and measure the largest logit difference.

    * merged: a copy of ``model`` with adapter ``name`` folded in (``peftlab.unload``), written with
      ``save_pretrained`` and read back with ``AutoModelForCausalLM.from_pretrained``;
    * adapter: ``peftlab.save_adapter`` (peft's format) loaded by ``peft.PeftModel.from_pretrained``
      onto ``fresh_base()``, an untouched copy of the base model.

    Logits are compared (float32) on the real tokens of two left-padded prompts; the reload uses the
    trained model's attention implementation. Returns ``merged_max_diff`` (reloaded merged model vs
    ``model``: folding W + s B A changes the order of float32 roundings, so a few 1e-5 on logits of
    size ``logit_scale``), ``reload_max_diff`` (merged model before vs after the file round trip: 0),
    ``peft_max_diff`` and the folders. ``model`` itself is left as it was.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftlab.data import PadCollator
    from peftlab.inject import unload
    from peftlab.io import save_adapter

    root = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="peftlab-chat-"))
    convs = probe_conversations or [e2e_conversation("name : The Eagle | food : French"),
                                    e2e_conversation("name : Alimentum | area : riverside | priceRange : cheap")]
    batch = PadCollator(tokenizer, side="left")([{"input_ids": p, "attention_mask": [1] * len(p)}
                                                 for p in (encode_prompt(tokenizer, c) for c in convs)])
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        want = model(**batch).logits.float()  # (B, T, V)
    model.train(was_training)
    merged = unload(copy.deepcopy(model), name)
    with torch.inference_mode():
        folded = merged.eval()(**batch).logits.float()  # (B, T, V): the merged model before it is written
    merged.save_pretrained(root / "merged")
    del merged
    # the same attention kernel as the trained model: eager and sdpa differ by ~1e-4 in float32
    attn = getattr(model.config, "_attn_implementation", None)
    reloaded = AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.float32,
                                                    **({"attn_implementation": attn} if attn else {})).eval()
    save_adapter(model, root / "adapter", name)
    peft_model = PeftModel.from_pretrained(fresh_base(), root / "adapter").eval()
    real = batch["attention_mask"].bool()  # (B, T); logits at padding positions mean nothing (sdpa leaves junk)
    with torch.inference_mode():
        from_disk = reloaded(**batch).logits.float()
        peft_diff = float((peft_model(**batch).logits.float() - want)[real].abs().max())
    return {"merged_max_diff": float((from_disk - want)[real].abs().max()),  # folding rounds in float32
            "reload_max_diff": float((from_disk - folded)[real].abs().max()),  # the file round trip: exact
            "peft_max_diff": peft_diff, "logit_scale": float(want[real].abs().max()),
            "merged_dir": str(root / "merged"), "adapter_dir": str(root / "adapter")}


def run_recipe(plan: ChatRecipe, *, progress: bool = False, log=print) -> dict:
    """The notebook's class-mode run in one call (the bench): load SmolLM2, score the base model on
    the held-out tables, train LoRA with ``plan``, score again. Returns scores, losses and timings."""
    import peftlab

    start = time.perf_counter()
    model, tok = peftlab.load_model("smollm2", task="causal-lm")
    splits = chat_splits(tok, plan)
    before = score_model(model, tok, splits["tables"], splits["references"], plan)
    log(f"seed {plan.seed}: before BLEU {before['bleu']:.1f}, ROUGE-L {before['rouge_l']:.3f} "
        f"({before['seconds']:.0f} s)")
    result = train_chat_lora(model, splits["train"], plan, eval_set=splits["validation"], progress=progress)
    after = score_model(model, tok, splits["tables"], splits["references"], plan)
    log(f"seed {plan.seed}: after BLEU {after['bleu']:.1f}, ROUGE-L {after['rouge_l']:.3f}, "
        f"train {result.train_seconds:.0f} s")
    return {"seed": plan.seed, "before": before, "after": after, "steps": result.steps,
            "train_s": result.train_seconds, "step_s": result.step_seconds,
            "losses": [round(h["loss"], 4) for h in result.history], "eval_loss": result.evals[-1]["loss"],
            "wall_s": time.perf_counter() - start}
