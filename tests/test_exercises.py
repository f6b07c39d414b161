"""The exercise checkers accept the worked solutions (kept here, out of the student's way) and
reject the typical wrong answers, each with a hint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftlab import exercises, seed


# -- worked solutions (what a teacher shows after the exercise) --------------------------------
def solution_lora_forward(x, W, b, A, B, alpha):
    r = A.shape[0]
    return x @ W.T + b + (alpha / r) * ((x @ A.T) @ B.T)  # never builds the (out, in) matrix


def solution_replace_linears(model, make):
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.encoder.")]
    for name in names:  # the list is complete before the first change
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make(model.get_submodule(name)))


def test_solutions_are_accepted(capsys):
    assert exercises.check_lora_forward(solution_lora_forward)
    assert exercises.check_replace_linears(solution_replace_linears)
    assert capsys.readouterr().out.count("right:") == 2


# -- typical wrong answers ----------------------------------------------------------------------
LORA_WRONG = {
    "no scaling": (lambda x, W, b, A, B, alpha: x @ W.T + b + x @ A.T @ B.T, "not scaled"),
    "alpha * r": (lambda x, W, b, A, B, alpha: x @ W.T + b + alpha * A.shape[0] * (x @ A.T @ B.T), "inverted"),
    "r / alpha": (lambda x, W, b, A, B, alpha: x @ W.T + b + A.shape[0] / alpha * (x @ A.T @ B.T), "inverted"),
    "the seed's order": (lambda x, W, b, A, B, alpha: x @ W.T + b + (alpha / A.shape[0]) * (x @ B @ A), "which factor"),
    "branch forgotten": (lambda x, W, b, A, B, alpha: x @ W.T + b, "missing"),
    "bias forgotten": (lambda x, W, b, A, B, alpha: x @ W.T + (alpha / A.shape[0]) * (x @ A.T @ B.T), "bias"),
    "square-only": (lambda x, W, b, A, B, alpha: x @ W + b + (alpha / A.shape[0]) * (x @ A.T @ B.T), ""),
}


@pytest.mark.parametrize("name", LORA_WRONG)
def test_wrong_lora_forwards_are_rejected_with_a_hint(name, capsys):
    fn, hint = LORA_WRONG[name]
    verdict = exercises.check_lora_forward(fn)
    assert not verdict and verdict.message and hint in verdict.message
    assert capsys.readouterr().out.startswith("wrong:")


def _dotted_setattr(model, make):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith("bert.encoder."):
            setattr(model, name, make(module))


def _everything(model, make):
    solution = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in solution:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, make(model.get_submodule(name)))


def _half(model, make):
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".attention." in n]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make(model.get_submodule(name)))


def _untouched_copy(model, make):
    import copy

    other = copy.deepcopy(model)
    solution_replace_linears(other, make)  # replaces layers of a copy: the model itself is unchanged


REPLACE_WRONG = {
    "the seed's loop": (lambda model, make: seed.seed_inject_lora(model, make), "changed size during iteration"),
    "dotted setattr on the root": (_dotted_setattr, "dots"),
    "pooler and classifier too": (_everything, "replaced too"),
    "attention only": (_half, "not replaced"),
    "works on a copy": (_untouched_copy, "not replaced"),
}


@pytest.mark.parametrize("name", REPLACE_WRONG)
def test_wrong_replacements_are_rejected_with_a_hint(name):
    fn, hint = REPLACE_WRONG[name]
    verdict = exercises.check_replace_linears(fn, quiet=True)
    assert not verdict and hint in verdict.message, verdict.message


def test_checker_survives_code_that_returns_nonsense():
    assert not exercises.check_lora_forward(lambda *args: "nothing", quiet=True)
    assert not exercises.check_lora_forward(lambda x, *rest: torch.zeros(3), quiet=True)


# -- the schedule, the prompt mask and numeric answers --------------------------------------------
import math  # noqa: E402


def solution_schedule(step, total, warmup, schedule):
    if step < warmup:
        return (step + 1) / warmup  # step 0 already moves
    p = (step - warmup) / max(total - warmup, 1)
    return max(0.0, 1 - p) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def _cosine_over_all_steps(step, total, warmup, schedule):  # forgets the warm-up offset in the cosine
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "linear":
        return max(0.0, 1 - (step - warmup) / (total - warmup))
    return 0.5 * (1 + math.cos(math.pi * step / total))


def _linear_for_both(step, total, warmup, schedule):  # agrees with cosine only at the midpoint
    return (step + 1) / warmup if step < warmup else max(0.0, 1 - (step - warmup) / (total - warmup))


def _no_warmup_guard(step, total, warmup, schedule):  # divides by a zero warm-up
    return (step + 1) / warmup if step <= warmup else solution_schedule(step, total, warmup, schedule)


def _ramp_from_zero(step, total, warmup, schedule):  # step 0 gets lr 0: a wasted step
    return step / warmup if step < warmup else solution_schedule(step, total, warmup, schedule)


def test_schedule_checker():
    assert exercises.check_schedule(solution_schedule, quiet=True)
    for wrong in (_cosine_over_all_steps, _linear_for_both, _no_warmup_guard, _ramp_from_zero):
        assert not exercises.check_schedule(wrong, quiet=True), wrong.__name__


def solution_prompt_mask(attention_mask, m):
    ones = torch.ones(attention_mask.shape[0], m, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([ones, attention_mask], dim=1)


MASK_WRONG = {
    "slice of the padded input": lambda mask, m: torch.cat([mask[:, :m] * 0 + 1, mask], dim=1),  # breaks for m > T
    "prompt at the end": lambda mask, m: torch.cat([mask, torch.ones(mask.shape[0], m, dtype=mask.dtype)], dim=1),
    "unchanged": lambda mask, m: mask,
    "float mask": lambda mask, m: torch.cat([torch.ones(mask.shape[0], m), mask.float()], dim=1),
    "prompt hidden": lambda mask, m: torch.cat([torch.zeros(mask.shape[0], m, dtype=mask.dtype), mask], dim=1),
}


def test_prompt_mask_checker():
    assert exercises.check_prompt_mask(solution_prompt_mask, quiet=True)
    for name, wrong in MASK_WRONG.items():
        assert not exercises.check_prompt_mask(wrong, quiet=True), name


def test_value_checker_hides_the_formula_and_rejects_near_misses():
    assert exercises.check_value("smollm2-flat-prefix-gqa", 115_200, quiet=True)
    assert not exercises.check_value("smollm2-flat-prefix-gqa", 57_600, quiet=True)  # keys only
    assert not exercises.check_value("smollm2-flat-prefix-mha", 115_200, quiet=True)  # the GQA count
    assert exercises.check_value("adamw-decay-left", 0.9048, quiet=True)
    assert not exercises.check_value("adamw-decay-left", 0.9, quiet=True)  # 1 - 1000 * lr * wd, linearised
    assert not exercises.check_value("adamw-decay-left", None, quiet=True)
    with pytest.raises(KeyError, match="known ones"):
        exercises.check_value("nope", 1)


# -- numeric exercises of notebooks 00-08: the right number passes, two typical slips fail --------------
D, F, L6 = 384, 1536, 6
NUMERIC = {
    # key: (worked solution, [typical wrong answers])
    "bert-base-parameters": ((30522 + 512 + 2 + 2) * 768 + 12 * (4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768
                                                                 + 4 * 768) + 768 * 768 + 768,
                             [(30522 + 512 + 2) * 768 + 12 * (4 * 768 * 768 + 2 * 768 * 3072),  # no biases, no norms
                              (30522 + 512 + 2 + 2) * 768 + 12 * (4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768
                                                                  + 4 * 768)]),  # no pooler
    "smollm2-layer-with-mha": (2 * 576 * 576 + 2 * 576 * 576 + 3 * 576 * 1536 + 2 * 576,
                               [2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576,  # the real (GQA) layer
                                4 * 576 * 576 + 2 * 576 * 1536 + 2 * 576]),  # a two-matrix feed-forward
    "adam-states-13b-gb": (208.0, [52.0, 26.0]),  # fp32 weights only; fp16 weights only
    "minilm-activations-32x256-mb": (4 * 32 * 256 * L6 * (10 * D + 2 * F + 3 * 12 * 256) / 1e6,
                                     [4 * 32 * 256 * L6 * (10 * D + 2 * F) / 1e6,  # attention maps forgotten
                                      4 * 32 * 256 * L6 * (10 * D + 2 * F + 3 * 12 * 128) / 1e6]),  # T of the lesson
    "rank2-error-of-6-4-3-2-1": (14 ** 0.5, [6.0, 14.0]),  # sum of the values; squared error
    "rank2-energy-of-6-4-3-2-1": (52 / 66, [10 / 16, 14 / 66]),  # unsquared; the part left out
    "minilm-lora-r4-all-six-maps": (L6 * (4 * 4 * 2 * D + 2 * 4 * (D + F)), [L6 * 6 * 2 * D * 4, 4 * 4 * 2 * D + 2 * 4 * (D + F)]),
    "minilm-lora-qv-r4-with-head": (L6 * 2 * 4 * 2 * D + 770, [L6 * 2 * 4 * 2 * D, L6 * 2 * 4 * D + 770]),
    "minilm-lora-qv-r8-with-head": (74_498, [73_728, 2 * 8 * 2 * D + 770]),
    "smollm2-houlsby-b64": ((2 * 576 * 64 + 64 + 576) * 2 * 30, [2 * 576 * 64 * 2 * 30, (2 * 576 * 64 + 64 + 576) * 30]),
    "minilm-pfeiffer-b-matching-lora-r16": (31, [16, 15]),  # b = r; half of it
    "minilm-houlsby-b16-macs-per-token": (2 * 6 * 2 * 16 * 384, [6 * 2 * 16 * 384, 2 * 16 * 384]),
    "merged-lora-macs-per-token": (0, [2 * 8 * 384, 8 * 384]),
}


@pytest.mark.parametrize("key", NUMERIC)
def test_numeric_exercises_accept_the_solution_and_reject_typical_slips(key):
    right, wrongs = NUMERIC[key]
    assert exercises.check_value(key, right, quiet=True), key
    for wrong in wrongs:
        assert not exercises.check_value(key, wrong, quiet=True), (key, wrong)


def test_merge_checker():
    assert exercises.check_merge(lambda W, A, B, alpha, r: W + (alpha / r) * B @ A, quiet=True)
    for wrong in (lambda W, A, B, alpha, r: W + B @ A,  # no scale
                  lambda W, A, B, alpha, r: W + (alpha / r) * (B @ A).T,  # a transposed update
                  lambda W, A, B, alpha, r: W + (r / alpha) * B @ A,
                  lambda W, A, B, alpha, r: None):
        assert not exercises.check_merge(wrong, quiet=True)


def test_attention_share_checker():
    class Maps:  # the two fields the checker reads
        tokens = ["[CLS]", "a", "superb", "film", "[SEP]"]
        attentions = [None, None, None, torch.softmax(torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(0)), -1)]

    row = Maps.attentions[3][0, 2]
    col = Maps.attentions[3][0, :, 2]
    assert exercises.check_attention_share(Maps, round(float(row[0] + row[-1]), 2), quiet=True)
    assert not exercises.check_attention_share(Maps, round(float(col[0] + col[-1]), 2), quiet=True)  # the column
    assert not exercises.check_attention_share(Maps, round(float(row[0]), 2), quiet=True)  # [CLS] only


def test_an_unwritten_exercise_is_reported_as_not_answered_yet(capsys):
    def stub(*args):
        raise NotImplementedError("your code here")

    for check in (exercises.check_lora_forward, exercises.check_schedule, exercises.check_prompt_mask,
                  exercises.check_merge):
        for fn in (stub, lambda *args: None):
            verdict = check(fn)
            assert not verdict and verdict.pending
    assert exercises.check_replace_linears(stub).pending
    assert exercises.check_value("merged-lora-macs-per-token", None).pending
    printed = capsys.readouterr().out.splitlines()
    assert printed and all(line.startswith("not answered yet:") for line in printed)
