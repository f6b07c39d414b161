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
