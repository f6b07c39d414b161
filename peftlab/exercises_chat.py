"""Checkers for the exercises of ``notebooks/13_capstone_instruction_tuning.ipynb``.

1. ``check_assistant_mask``: the student writes the assistant-only labels of a conversation by
   hand; they are compared with ``peftlab.chat.encode_conversation`` on seeded random
   conversations (random system message, one to three exchanges, random words), and the first
   mismatching token is named.
2. ``measure_targets`` + ``check_target_choice``: a short, fixed-budget measurement of a few
   LoRA target lists (held-out assistant-token loss and trainable parameters), then a check that
   the student's pick follows from that table by the rule the notebook states.

Same conventions as ``peftlab.exercises``: checkers print and return a ``Verdict``; an answer still
``None`` (or a function raising ``NotImplementedError``) is "not answered yet".
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from peftlab.exercises import PENDING_CODE, PENDING_VALUE, Verdict, _crash, _report, _unwritten

__all__ = ["random_conversation", "check_assistant_mask", "TARGET_OPTIONS", "measure_targets",
           "best_target", "check_target_choice", "LOSS_TOLERANCE"]

_WORDS = ("the", "menu", "river", "cheap", "pub", "coffee", "family", "rating", "near", "city", "centre",
          "Italian", "five", "stars", "serves", "food", "is", "a", "not", "friendly", "high", "price", "we",
          "what", "where", "why", "is", "it", "good", "Tell", "me", "more", "please", "Yes", "No", "3", "£20")


def random_conversation(rng: random.Random) -> list[dict]:
    """An optional system message, then 1-3 user/assistant exchanges of random words."""
    def text() -> str:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(1, 9))]
        return " ".join(words) + rng.choice((".", "?", "!", ""))

    messages = [{"role": "system", "content": text()}] if rng.random() < 0.7 else []
    for _ in range(rng.randint(1, 3)):
        messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
    return messages


def _describe(tokenizer, ids: list[int], t: int) -> str:
    return repr(tokenizer.decode([ids[t]]))


def check_assistant_mask(fn: Callable, tokenizer, n: int = 40, seed: int = 13, quiet: bool = False) -> Verdict:
    """``fn(tokenizer, messages)`` must return the labels of ``messages`` rendered by the chat
    template: the token id on every assistant content token and on the end-of-turn token closing
    it, -100 everywhere else. Compared with ``peftlab.chat.encode_conversation`` on ``n`` seeded
    random conversations (single- and multi-turn, with and without a system message)."""
    from peftlab.chat import encode_conversation

    rng = random.Random(seed)
    for k in range(n):
        messages = random_conversation(rng)
        want = encode_conversation(tokenizer, messages)
        try:
            got = fn(tokenizer, [dict(m) for m in messages])
        except Exception as exc:  # the student's code: any error is a finding, not a crash of the checker
            if _unwritten(exc):
                return _report(Verdict(False, PENDING_CODE, pending=True), quiet)
            return _report(Verdict(False, f"conversation {k}: " + _crash(exc)), quiet)
        if got is None:
            return _report(Verdict(False, PENDING_CODE, pending=True), quiet)
        got = got.tolist() if torch.is_tensor(got) else list(got)
        ids, labels = want["input_ids"], want["labels"]
        turns = sum(m["role"] == "assistant" for m in messages)
        if len(got) != len(ids):
            return _report(Verdict(False, f"conversation {k} ({turns} assistant turns) has {len(ids)} tokens but "
                                          f"your labels have {len(got)} entries: one label per token"), quiet)
        for t, (g, w) in enumerate(zip(got, labels)):
            if g == w:
                continue
            token = _describe(tokenizer, ids, t)
            if w == -100:
                why = ("it is the newline after the end-of-turn token" if t > 0 and labels[t - 1] != -100
                       else "it is not part of an assistant's reply (system, user or a role header)")
                msg = f"token {t} {token} got label {g}, want -100: {why}"
            elif g == -100:
                why = ("it closes the assistant turn, and the model must learn to stop"
                       if t + 1 == len(labels) or labels[t + 1] == -100 else "it is inside an assistant's reply")
                msg = f"token {t} {token} got -100, want its id {w}: {why}"
            else:
                msg = f"token {t} {token} got label {g}, want its own id {w} (labels are the input ids, unshifted)"
            return _report(Verdict(False, f"conversation {k} ({turns} assistant turns, "
                                          f"{'with' if messages[0]['role'] == 'system' else 'no'} system): {msg}"),
                           quiet)
    return _report(Verdict(True, f"the same labels as peftlab.chat on {n} random conversations "
                                 "(1-3 turns, with and without a system message)"), quiet)


# -- picking target modules from a measurement ----------------------------------------------------
TARGET_OPTIONS = {
    "q,v": ("q_proj", "v_proj"),  # the LoRA paper's choice
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all-linear": "all-linear",  # q, k, v, o, gate, up, down
}
LOSS_TOLERANCE = 0.02  # nats: loss differences smaller than this count as a tie at this budget


def measure_targets(model, train_set, eval_set, plan, steps: int, options: dict | None = None) -> dict:
    """Train a LoRA of ``plan`` (rank, lr, seed, precision) on each option's targets for ``steps``
    steps, from the same start and on the same batches; returns ``{option: {"loss", "trainable",
    "seconds"}}`` with the held-out assistant-token loss. ``model`` must carry no adapter; every
    probe adapter is deleted again, so it ends as it started."""
    from peftlab.inject import configs, count_parameters, delete
    from peftlab.chat import train_chat_lora

    if configs(model):
        raise ValueError(f"measure_targets needs a model without adapters; this one has {list(configs(model))}: "
                         "pass a fresh base model (peftlab.load_model)")
    table = {}
    for key, targets in (options or TARGET_OPTIONS).items():
        name = "probe_" + "".join(c if c.isalnum() else "_" for c in key)
        try:
            result = train_chat_lora(model, train_set, plan, eval_set=eval_set, name=name, target_modules=targets,
                                     steps=steps, progress=False)
            table[key] = {"loss": result.evals[-1]["loss"], "trainable": count_parameters(model).trainable,
                          "seconds": result.train_seconds}
        finally:
            if name in configs(model):
                delete(model, name)
    return table


def best_target(table: dict, tolerance: float = LOSS_TOLERANCE) -> str:
    """The notebook's rule: lowest held-out loss; among options within ``tolerance`` of it, the one
    with the fewest trainable parameters."""
    low = min(row["loss"] for row in table.values())
    near = [k for k, row in table.items() if row["loss"] <= low + tolerance]
    return min(near, key=lambda k: table[k]["trainable"])


def check_target_choice(table: dict, choice, quoted_loss, quiet: bool = False) -> Verdict:
    """``choice`` (a key of ``table``) must be ``best_target(table)``, and ``quoted_loss`` its measured
    loss to 3 decimals (the evidence the choice rests on)."""
    if choice is None or quoted_loss is None:
        return _report(Verdict(False, PENDING_VALUE, pending=True), quiet)
    if choice not in table:
        return _report(Verdict(False, f"{choice!r} is not one of the measured options {sorted(table)}"), quiet)
    if isinstance(quoted_loss, bool) or not isinstance(quoted_loss, (int, float)):
        return _report(Verdict(False, f"the quoted loss must be a number, got {type(quoted_loss).__name__}"), quiet)
    if abs(quoted_loss - table[choice]["loss"]) > 5e-4:
        return _report(Verdict(False, f"you quote a loss of {quoted_loss:.4f} for {choice!r}; read the table "
                                      "again for that option's held-out loss"), quiet)
    best = best_target(table)
    if choice != best:
        low = min(row["loss"] for row in table.values())
        row = table[choice]
        if row["loss"] > low + LOSS_TOLERANCE:
            why = f"its loss is more than {LOSS_TOLERANCE} above the lowest one in the table"
        else:
            why = "another option is as good (within the tolerance) and trains fewer parameters"
        return _report(Verdict(False, f"{choice!r} does not follow from the table: {why}"), quiet)
    return _report(Verdict(True, f"{choice!r}: the lowest held-out loss within {LOSS_TOLERANCE} nats at the fewest "
                                 f"trainable parameters ({table[choice]['trainable']:,})"), quiet)
