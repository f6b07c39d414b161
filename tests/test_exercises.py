"""The exercise checkers accept the worked solutions (kept here, out of the student's way) and
reject the typical wrong answers, each with a hint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftlab import exercises, exercises_chat, exercises_merging, exercises_serving, seed


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
    assert exercises.check_value("merged-lora-macs-per-token", 0, quiet=True)
    assert not exercises.check_value("merged-lora-macs-per-token", 0.5, quiet=True)  # an integer answer, exactly
    assert exercises.check_value("adamw-decay-left", 0.9048, quiet=True)
    assert not exercises.check_value("adamw-decay-left", 0.9, quiet=True)  # 1 - 1000 * lr * wd, linearised
    assert not exercises.check_value("adamw-decay-left", None, quiet=True)
    with pytest.raises(KeyError, match="known ones"):
        exercises.check_value("nope", 1)


# -- numeric exercises of notebooks 00-09: the right number passes, two typical slips fail --------------
D, F, L6 = 384, 1536, 6
NUMERIC = {
    # key: (worked solution, [typical wrong answers])
    "smollm2-layer-with-mha": (2 * 576 * 576 + 2 * 576 * 576 + 3 * 576 * 1536 + 2 * 576,
                               [2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576,  # the real (GQA) layer
                                4 * 576 * 576 + 2 * 576 * 1536 + 2 * 576]),  # a two-matrix feed-forward
    "minilm-activations-32x256-mb": (4 * 32 * 256 * L6 * (10 * D + 2 * F + 3 * 12 * 256) / 1e6,
                                     [4 * 32 * 256 * L6 * (10 * D + 2 * F) / 1e6,  # attention maps forgotten
                                      4 * 32 * 256 * L6 * (10 * D + 2 * F + 3 * 12 * 128) / 1e6]),  # T of the lesson
    "rank2-error-of-6-4-3-2-1": (14 ** 0.5, [6.0, 14.0]),  # sum of the values; squared error
    "rank2-energy-of-6-4-3-2-1": (52 / 66, [10 / 16, 14 / 66]),  # unsquared; the part left out
    "minilm-lora-r4-all-six-maps": (L6 * (4 * 4 * 2 * D + 2 * 4 * (D + F)), [L6 * 6 * 2 * D * 4, 4 * 4 * 2 * D + 2 * 4 * (D + F)]),
    "minilm-lora-qv-r4-with-head": (L6 * 2 * 4 * 2 * D + 770, [L6 * 2 * 4 * 2 * D, L6 * 2 * 4 * D + 770]),
    "smollm2-houlsby-b64": ((2 * 576 * 64 + 64 + 576) * 2 * 30, [2 * 576 * 64 * 2 * 30, (2 * 576 * 64 + 64 + 576) * 30]),
    "minilm-pfeiffer-b-matching-lora-r16": (31, [16, 15]),  # b = r; half of it
    "minilm-houlsby-b16-macs-per-token": (2 * 6 * 2 * 16 * 384, [6 * 2 * 16 * 384, 2 * 16 * 384]),
    "merged-lora-macs-per-token": (0, [2 * 8 * 384, 8 * 384]),
    "nf4-bits-block128-double-quant": (4 + 8 / 128 + 32 / 128 / 256, [4 + 32 / 128, 4 + 8 / 64 + 32 / 64 / 256]),
    "smollm2-ia3-default-params": (30 * (192 + 192 + 1536), [30 * (576 + 576 + 1536), 30 * (192 + 192 + 576)]),
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


# -- code exercises of notebooks 00, 02, 05, 08 and 09: solutions pass, typical slips fail with a hint ------
def solution_gpt2_count(c):
    d, f, L = c.n_embd, c.n_inner or 4 * c.n_embd, c.n_layer
    embeddings = (c.vocab_size + c.n_positions) * d  # token and position; the LM head is tied to wte
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)  # ln_1, ln_2, qkv, proj, MLP
    return embeddings + L * block + 2 * d  # + ln_f


def _gpt2_bert_style(c):  # the BERT formula of the notebook: token types, embedding LayerNorm, pooler
    d = c.n_embd
    return solution_gpt2_count(c) - 2 * d + 4 * d + d * d + d


def _gpt2_no_final_norm(c):
    return solution_gpt2_count(c) - 2 * c.n_embd


def _gpt2_four_d(c):  # ignores n_inner
    return solution_gpt2_count(type(c)(**{**c.to_dict(), "n_inner": None}))


def _gpt2_small_only(c):
    return 124_439_808


def test_gpt2_count_checker():
    assert exercises.check_gpt2_count(solution_gpt2_count, quiet=True)
    for wrong, hint in ((_gpt2_bert_style, "too large"), (_gpt2_no_final_norm, "ln_f"), (_gpt2_four_d, "n_inner"),
                        (_gpt2_small_only, "too large")):
        verdict = exercises.check_gpt2_count(wrong, quiet=True)
        assert not verdict and hint in verdict.message, (wrong.__name__, verdict.message)
    assert exercises.check_gpt2_count(lambda c: None, quiet=True).pending


def test_state_bytes_checker():
    assert exercises.check_state_bytes(lambda n, k: 4 * n + 12 * k, quiet=True)
    for wrong, hint in ((lambda n, k: 16 * n, "no gradient"), (lambda n, k: 16 * k, "frozen weights"),
                        (lambda n, k: 4 * n + 8 * k, "gradient")):
        verdict = exercises.check_state_bytes(wrong, quiet=True)
        assert not verdict and hint in verdict.message, verdict.message


def solution_svd_factors(W, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r] * S[:r], Vh[:r]  # B (m, r) carries the values, A (r, n) the orthonormal rows


def _factors_no_values(W, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r], Vh[:r]


def _factors_smallest(W, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, -r:] * S[-r:], Vh[-r:]


def _factors_values_in_a(W, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r], S[:r, None] * Vh[:r]


def _factors_columns_of_vh(W, r):  # Vh's columns instead of its rows
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r] * S[:r], Vh[:, :r].T if Vh.shape[0] == Vh.shape[1] else Vh[:r]


def test_svd_factors_checker():
    assert exercises.check_svd_factors(solution_svd_factors, quiet=True)
    for wrong, hint in ((_factors_no_values, "missing the singular values"), (_factors_smallest, "largest"),
                        (_factors_values_in_a, "orthonormal"), (_factors_columns_of_vh, "rows of Vh"),
                        (lambda W, r: (W, W.T), "must be")):
        verdict = exercises.check_svd_factors(wrong, quiet=True)
        assert not verdict and hint in verdict.message, (wrong, verdict.message)


class SolutionAdapter(nn.Module):
    def __init__(self, d, b):
        super().__init__()
        self.down, self.up = nn.Linear(d, b), nn.Linear(b, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return h + self.up(torch.relu(self.down(h)))


class _NoSkip(SolutionAdapter):
    def forward(self, h):
        return self.up(torch.relu(self.down(h)))


class _RandomUp(SolutionAdapter):  # the seed's both-random init
    def __init__(self, d, b):
        nn.Module.__init__(self)
        self.down, self.up = nn.Linear(d, b), nn.Linear(b, d)


class _BothZero(SolutionAdapter):
    def __init__(self, d, b):
        super().__init__(d, b)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)


class _Linear(SolutionAdapter):
    def forward(self, h):
        return h + self.up(self.down(h))


class _WrongWidth(SolutionAdapter):  # sized by another dimension than the hidden state's
    def __init__(self, d, b):
        super().__init__(b, d)


def test_adapter_checker():
    assert exercises.check_adapter(SolutionAdapter, quiet=True)
    for wrong, hint in ((_NoSkip, "changes its input"), (_RandomUp, "changes its input"), (_BothZero, "no gradient"),
                        (_Linear, "non-linearity"), (_WrongWidth, "sized by")):
        verdict = exercises.check_adapter(wrong, quiet=True)
        assert not verdict and hint in verdict.message, (wrong.__name__, verdict.message)


def test_adapter_checker_is_not_fooled_by_an_identity_that_cannot_learn():
    class SkipOnlyAtInit(SolutionAdapter):  # returns h itself while the branch is zero, then drops h
        def forward(self, h):
            branch = self.up(torch.relu(self.down(h)))
            return h if not branch.abs().sum() else branch

    verdict = exercises.check_adapter(SkipOnlyAtInit, quiet=True)
    assert not verdict and "nothing could learn" in verdict.message


def solution_heatmap(ax, weights, tokens):
    ax.imshow(weights, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(tokens)), tokens, rotation=90)
    ax.set_yticks(range(len(tokens)), tokens)


def test_heatmap_checker():
    assert exercises.check_heatmap(solution_heatmap, quiet=True)
    wrongs = {
        "transposed": (lambda ax, w, t: solution_heatmap(ax, w.T, t), "transposed"),
        "free colour scale": (lambda ax, w, t: (ax.imshow(w), ax.set_xticks(range(len(t)), t),
                                                ax.set_yticks(range(len(t)), t)), "colour scale"),
        "no labels": (lambda ax, w, t: ax.imshow(w, vmin=0, vmax=1), "tick labels"),
        "keys only": (lambda ax, w, t: (ax.imshow(w, vmin=0, vmax=1), ax.set_xticks(range(len(t)), t)), "queries"),
        "a bar plot": (lambda ax, w, t: ax.bar(range(len(t)), w[0]), "imshow"),
    }
    for name, (wrong, hint) in wrongs.items():
        verdict = exercises.check_heatmap(wrong, quiet=True)
        assert not verdict and hint in verdict.message, (name, verdict.message)
    assert exercises.check_heatmap(lambda ax, w, t: None, quiet=True).pending


def solution_lora_count(model, r, targets):
    return sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets)


def _lora_count_square(model, r, targets):  # assumes every map is hidden x hidden
    d = model.config.hidden_size
    return sum(2 * r * d for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets)


def _lora_count_full(model, r, targets):  # counts the matrices being adapted, not the factors
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets)


def _lora_count_injects(model, r, targets):  # right number, but it changed the model to get it
    from peftlab.config import LoRAConfig
    from peftlab.inject import count_parameters, inject

    return count_parameters(inject(model, LoRAConfig(r=r, target_modules=targets))).by_kind["lora"]


def test_lora_count_checker():
    assert exercises.check_lora_count(solution_lora_count, quiet=True)
    for wrong, hint in ((_lora_count_square, "not square"), (_lora_count_full, "too large"),
                        (_lora_count_injects, "do not change the model")):
        verdict = exercises.check_lora_count(wrong, quiet=True)
        assert not verdict and hint in verdict.message, (wrong.__name__, verdict.message)


def test_gate_value_rejects_the_one_key_slip():
    assert exercises.check_value("prefix-gate-one-slot-ln3", 0.6, quiet=True)
    assert not exercises.check_value("prefix-gate-one-slot-ln3", 0.75, quiet=True)  # sigma(ln 3): one real key
    assert not exercises.check_value("prefix-gate-one-slot-ln3", 0.4, quiet=True)  # the frozen part, 1 - lambda


def solution_prefix_count(config, m):
    return 2 * config.num_hidden_layers * m * config.num_key_value_heads * config.head_dim


def test_prefix_count_checker():
    assert exercises.check_prefix_count(solution_prefix_count, quiet=True)
    wrongs = {
        "hidden size for the width": (lambda c, m: 2 * c.num_hidden_layers * m * c.hidden_size, "not hidden_size"),
        "keys only": (lambda c, m: solution_prefix_count(c, m) // 2, "keys and values"),
        "every query head": (lambda c, m: 2 * c.num_hidden_layers * m * c.num_attention_heads * c.head_dim,
                             "num_key_value_heads x head_dim"),
        "SmolLM2's number for every model": (lambda c, m: 115_200, ""),
    }
    for name, (wrong, hint) in wrongs.items():
        verdict = exercises.check_prefix_count(wrong, quiet=True)
        assert not verdict and hint in verdict.message, (name, verdict.message)


# -- notebook 06: NF4 indices and DoRA's weight ------------------------------------------------------------
def solution_nf4_quantize(w, code, block_size):
    blocks = w.view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    x = blocks / torch.where(absmax == 0, 1.0, absmax)[:, None]
    return (x.reshape(-1, 1) - code).abs().argmin(dim=1), absmax


def _nf4_one_scale(w, code, block_size):  # one absmax for the whole tensor
    absmax = w.abs().max().expand(w.numel() // block_size)
    return (w.reshape(-1, 1) / absmax[0] - code).abs().argmin(dim=1), absmax


def _nf4_signed_max(w, code, block_size):  # the largest value, not the largest |value|
    absmax = w.view(-1, block_size).amax(dim=1)
    x = w.view(-1, block_size) / torch.where(absmax == 0, 1.0, absmax)[:, None]
    return (x.reshape(-1, 1) - code).abs().argmin(dim=1), absmax


def _nf4_uniform(w, code, block_size):  # evenly spaced 4-bit levels instead of the NF4 values
    idx, absmax = solution_nf4_quantize(w, code, block_size)
    x = w.view(-1, block_size) / torch.where(absmax == 0, 1.0, absmax)[:, None]
    return torch.round((x.reshape(-1) + 1) * 7.5).long(), absmax


def test_nf4_quantize_checker(capsys):
    assert exercises.check_nf4_quantize(solution_nf4_quantize, quiet=True)
    hints = {_nf4_one_scale: "same scale", _nf4_signed_max: "largest |w|", _nf4_uniform: "not evenly spaced"}
    for wrong, hint in hints.items():
        verdict = exercises.check_nf4_quantize(wrong, quiet=True)
        assert not verdict and hint in verdict.message, (wrong.__name__, verdict.message)
    assert exercises.check_nf4_quantize(lambda w, c, b: None, quiet=True).pending
    floats = exercises.check_nf4_quantize(lambda w, c, b: (c[solution_nf4_quantize(w, c, b)[0]],
                                                            solution_nf4_quantize(w, c, b)[1]), quiet=True)
    assert not floats and "integer" in floats.message


def solution_dora_weight(W, A, B, m, scale):
    V = W + scale * B @ A
    return m[:, None] * V / V.norm(dim=1, keepdim=True)


def test_dora_weight_checker():
    assert exercises.check_dora_weight(solution_dora_weight, quiet=True)
    wrongs = {
        "per output row": lambda W, A, B, m, s: m[:, None] * (W + s * B @ A) / (W + s * B @ A).norm(dim=0, keepdim=True),
        "not of W": lambda W, A, B, m, s: m[:, None] * (W + s * B @ A) / W.norm(dim=1, keepdim=True),
        "scale * B A": lambda W, A, B, m, s: m[:, None] * (W + B @ A) / (W + B @ A).norm(dim=1, keepdim=True),
        "magnitude m": lambda W, A, B, m, s: (W + s * B @ A) / (W + s * B @ A).norm(dim=1, keepdim=True),
    }
    for hint, wrong in wrongs.items():
        verdict = exercises.check_dora_weight(wrong, quiet=True)
        assert not verdict and hint in verdict.message, (hint, verdict.message)
    shape = exercises.check_dora_weight(lambda W, A, B, m, s: (W + s * B @ A).T, quiet=True)
    assert not shape


# -- the notebooks' exercises, as a whole ----------------------------------------------------------------
import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# the student types a number or names an option; every other check runs the student's code
VALUE_CHECKS = {"check_value", "check_attention_share", "check_serving_memory", "check_target_choice"}
CHECK_CALL = r"exercises(?:_\w+)?\.(check_\w+)\("  # peftlab.exercises or a later notebook's exercises_<topic>


def _exercises(path: Path) -> list[tuple[str, list[str]]]:
    """(heading, the checks called in the cells up to the next exercise) for each exercise of a notebook."""
    found = []
    for cell in json.loads(path.read_text())["cells"]:
        text = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            for heading in re.findall(r"(?:\*\*|### )(Exercise \d+[^*\n]*)", text):
                found.append((heading, []))
        elif found:
            found[-1][1].extend(re.findall(CHECK_CALL, text))
    return found


def test_every_exercise_is_checked_and_at_least_half_ask_for_code():
    exercises_ = [(path.name, heading, checks) for path in NOTEBOOKS for heading, checks in _exercises(path)]
    assert len(exercises_) >= 20
    unchecked = [(name, heading) for name, heading, checks in exercises_ if not checks]
    assert not unchecked, f"exercises without a checker (name them 'Going further' if open): {unchecked}"
    code = [e for e in exercises_ if set(e[2]) - VALUE_CHECKS]
    assert 2 * len(code) >= len(exercises_), f"{len(code)} of {len(exercises_)} exercises ask for code"
    for path in NOTEBOOKS:
        assert len(_exercises(path)) >= 2, path.name


def test_every_checker_and_stored_answer_is_used_by_a_notebook():
    text = "".join(path.read_text() for path in NOTEBOOKS)
    checkers = [name for name in exercises.__all__ if name.startswith("check_")]
    assert [c for c in checkers if f"exercises.{c}(" not in text] == []
    called = set(re.findall(CHECK_CALL, text))
    for module in (exercises_chat, exercises_merging, exercises_serving):
        assert [c for c in dir(module) if c.startswith("check_") and c not in called] == [], module.__name__
    assert [key for key in exercises._answers() if f'\\"{key}\\"' not in text] == []


def test_no_check_cell_computes_its_own_answer():
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            text = "".join(cell["source"])
            if cell["cell_type"] == "code" and re.search(CHECK_CALL, text):
                body = re.sub(r'"[^"]*"', '""', text.replace("from peftlab import exercises\n", ""))  # keys are names
                assert not re.search(r"expected|==|unified\.|lowrank\.|\d{3,}", body), (path.name, text)
