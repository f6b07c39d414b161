"""Checkers for the notebooks' exercises: the student writes code, the checker runs it.

Each checker calls the student's function on several random shapes and edge cases, compares
with a float64 reference computed here, and prints ``right`` or ``wrong`` with a hint that
names the symptom (never the answer). It returns True or False, so a notebook cell can also
``assert`` it. The tests (``tests/test_exercises.py``) hold worked solutions, which must pass,
and the typical wrong answers, which must fail.
"""

from __future__ import annotations

import traceback
from typing import Callable

import torch
from torch import nn

__all__ = ["check_lora_forward", "check_replace_linears", "check_schedule", "check_prompt_mask", "check_value",
           "check_merge", "check_attention_share", "Verdict"]


class Verdict:
    """What a checker found: ``ok`` and a one-line message (printed by the checkers).

    ``pending``: nothing to judge yet (the answer is still ``None``, or the function still raises
    ``NotImplementedError``); it counts as not right.
    """

    def __init__(self, ok: bool, message: str, pending: bool = False) -> None:
        self.ok, self.message, self.pending = ok, message, pending

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        if self.pending:
            return "not answered yet: " + self.message
        return ("right: " if self.ok else "wrong: ") + self.message


PENDING_VALUE = "set your answer above and re-run this cell"
PENDING_CODE = "write the function above and re-run this cell"


def _unwritten(exc: BaseException | None = None, result=None) -> bool:
    return isinstance(exc, NotImplementedError) or (exc is None and result is None)


def _report(verdict: Verdict, quiet: bool) -> Verdict:
    if not quiet:
        print(verdict)
    return verdict


def _tensor_verdict(got, want_shape, expectation: str) -> Verdict | None:
    """None when ``got`` is a tensor of ``want_shape``; else "not answered yet" (``got`` is None) or
    a wrong verdict: ``expectation`` followed by the wanted and the given shape."""
    if got is None:
        return Verdict(False, PENDING_CODE, pending=True)
    if not torch.is_tensor(got) or tuple(got.shape) != tuple(want_shape):
        shape = tuple(got.shape) if torch.is_tensor(got) else type(got).__name__
        return Verdict(False, f"{expectation} {tuple(want_shape)}, got {shape}")
    return None


def _crash(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1]
    return f"it raised {type(exc).__name__}: {exc} (line {last.lineno})"


# -- a LoRA forward in the paper's convention ---------------------------------------------------
def check_lora_forward(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(x, W, b, A, B, alpha)`` must return the LoRA layer's output
    x W^T + b + (alpha / r) x A^T B^T, with W (out, in), b (out,), A (r, in), B (out, r),
    for x of shape (..., in). Checked on non-square layers, ranks 1..8 and 1-, 2- and 3-D inputs.
    """
    g = torch.Generator().manual_seed(0)
    cases = [((5,), 7, 3, 2, 16.0), ((2, 4), 6, 10, 8, 8.0), ((3, 1, 5), 5, 4, 1, 1.0), ((4,), 9, 9, 4, 32.0)]
    for lead, d_in, d_out, r, alpha in cases:
        x = torch.randn(*lead, d_in, generator=g, dtype=torch.float64)
        W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
        b = torch.randn(d_out, generator=g, dtype=torch.float64)
        A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
        B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
        want = x @ W.T + b + (alpha / r) * (x @ A.T @ B.T)
        try:
            got = fn(x.clone(), W.clone(), b.clone(), A.clone(), B.clone(), alpha)
        except Exception as exc:  # the student's code: any error is a finding, not a crash of the checker
            if _unwritten(exc):
                return _report(Verdict(False, PENDING_CODE, pending=True), quiet)
            hint = (" -- check which factor meets x first: A is (r, in), so x A^T is (..., r)"
                    if "shape" in str(exc) or "size" in str(exc) else "")
            return _report(Verdict(False, _crash(exc) + hint), quiet)
        problem = _tensor_verdict(got, want.shape, f"for x of shape {tuple(x.shape)} and a {d_in} -> {d_out} "
                                                   "layer the output must be")
        if problem is not None:
            return _report(problem, quiet)
        if torch.allclose(got.double(), want, atol=1e-8, rtol=1e-6):
            continue
        base = x @ W.T + b
        branch = x @ A.T @ B.T
        if torch.allclose(got.double(), base, atol=1e-8):
            msg = "the output is the base layer's alone: the low-rank branch is missing"
        elif torch.allclose(got.double(), base + branch, atol=1e-8) and alpha != r:
            msg = f"the branch is not scaled: with alpha={alpha} and r={r} it must be multiplied by alpha / r"
        elif torch.allclose(got.double(), base + alpha * r * branch, atol=1e-6) or torch.allclose(
                got.double(), base + (r / alpha) * branch, atol=1e-8):
            msg = "the scale is inverted: it is alpha divided by r"
        elif torch.allclose(got.double(), x @ W.T + (alpha / r) * branch, atol=1e-8):
            msg = "the bias b is missing"
        else:
            msg = f"the values differ from the LoRA formula for x {tuple(x.shape)}, r={r}, alpha={alpha}"
        return _report(Verdict(False, msg), quiet)
    return _report(Verdict(True, "matches x W^T + b + (alpha/r) x A^T B^T on every shape tried"), quiet)


# -- replacing layers through their parent ------------------------------------------------------
class _Marked(nn.Module):
    """What the checker's ``make`` returns: the layer, plus a constant so the change is visible."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x) + 0.5


def _tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def check_replace_linears(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(model, make)`` must replace every ``nn.Linear`` inside ``model.bert.encoder`` by
    ``make(layer)``, in place, and leave the pooler and the classifier alone."""
    model = _tiny_bert()
    x = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        before = model(input_ids=x).logits
    expected = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.encoder.")]
    try:
        fn(model, _Marked)
    except Exception as exc:
        if _unwritten(exc):
            return _report(Verdict(False, PENDING_CODE, pending=True), quiet)
        hint = (" -- the loop adds modules while named_modules() is still walking them: collect the names "
                "first (list(...)), then replace" if "changed size during iteration" in str(exc) else "")
        return _report(Verdict(False, _crash(exc) + hint), quiet)
    stray = [f"{p or 'model'}.{c}" for p, m in model.named_modules() for c in m._modules if "." in c]
    if stray:
        return _report(Verdict(False, f"{len(stray)} modules now have a child whose name contains dots "
                                      f"(e.g. {stray[0]!r}): setattr on the root adds an attribute, it does not "
                                      "reach the layer; set it on the layer's parent"), quiet)
    missed = [n for n in expected if not isinstance(model.get_submodule(n), _Marked)]
    if missed:
        return _report(Verdict(False, f"{len(missed)} of {len(expected)} encoder linear layers were not replaced "
                                      f"(e.g. {missed[0]!r})"), quiet)
    for keep in ("bert.pooler.dense", "classifier"):
        if not isinstance(model.get_submodule(keep), nn.Linear):
            return _report(Verdict(False, f"{keep!r} was replaced too: only the encoder's layers should be"), quiet)
    doubled = [n for n, m in model.named_modules() if isinstance(m, _Marked) and isinstance(m.layer, _Marked)]
    if doubled:
        return _report(Verdict(False, f"{doubled[0]!r} was wrapped twice: walk a list of the original layers"),
                       quiet)
    with torch.no_grad():
        after = model(input_ids=x).logits
    if torch.equal(after, before):
        return _report(Verdict(False, "the model computes the same as before: the new layers are never called"),
                       quiet)
    return _report(Verdict(True, f"all {len(expected)} encoder linear layers replaced through their parents, "
                                 "pooler and classifier untouched"), quiet)


# -- a warm-up schedule ---------------------------------------------------------------------------
def check_schedule(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(step, total, warmup, schedule)`` must return the learning-rate multiplier of
    ``peftlab.train.lr_factor`` for the 0-based ``step``: (step + 1) / warmup during the warm-up
    (so step 0 already moves), then, with p = (step - warmup) / (total - warmup), linear 1 - p or
    cosine (1 + cos(pi p)) / 2. Checked at every step of several (total, warmup) pairs, warmup 0 included,
    so a formula that only agrees where linear and cosine cross (the middle) fails."""
    from peftlab.train import lr_factor

    for total, warmup in ((200, 20), (57, 0), (10, 9), (1000, 100)):
        for schedule in ("linear", "cosine"):
            for step in range(total + 1):
                want = lr_factor(step, total, warmup, schedule)
                try:
                    got = fn(step, total, warmup, schedule)
                except Exception as exc:
                    if _unwritten(exc):
                        return _report(Verdict(False, PENDING_CODE, pending=True), quiet)
                    return _report(Verdict(False, f"for step {step} of {total} (warm-up {warmup}, {schedule}) "
                                                  + _crash(exc)), quiet)
                if got is None:
                    return _report(Verdict(False, PENDING_CODE, pending=True), quiet)
                if not isinstance(got, (int, float)) and not (torch.is_tensor(got) and got.numel() == 1):
                    return _report(Verdict(False, f"return a number, got {type(got).__name__}"), quiet)
                if abs(float(got) - want) > 1e-6:
                    where = "during the warm-up" if step < warmup else "after the warm-up"
                    hint = (" (is the cosine measured from the end of the warm-up, p = (step - W) / (S - W)?)"
                            if schedule == "cosine" and step >= warmup else "")
                    return _report(Verdict(False, f"{schedule}, {total} steps, warm-up {warmup}: step {step} "
                                                  f"({where}) gives {float(got):.4f}{hint}"), quiet)
    return _report(Verdict(True, "the same multiplier as peftlab.train.lr_factor at every step of every case"), quiet)


# -- the attention mask of prompt tuning ------------------------------------------------------------
def check_prompt_mask(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(attention_mask, m)`` must return the (B, m + T) mask for m prompt vectors in front of a
    (B, T) 0/1 mask: m ones, then the mask. Checked with right and left padding, m < T, m = T,
    m > T and m = 0, and for the input's dtype."""
    g = torch.Generator().manual_seed(3)
    cases = []
    for B, T, m in ((2, 3, 2), (3, 4, 7), (1, 5, 5), (4, 6, 0), (2, 1, 3)):
        mask = torch.ones(B, T, dtype=torch.long)
        for row in range(B):
            pad = int(torch.randint(0, T, (1,), generator=g))
            if row % 2:
                mask[row, T - pad:] = 0  # right padding
            else:
                mask[row, :pad] = 0  # left padding
        cases.append((mask, m))
    cases.append((torch.tensor([[1, 1, 0]], dtype=torch.bool), 2))
    for mask, m in cases:
        want = torch.cat([torch.ones(mask.shape[0], m, dtype=mask.dtype), mask], dim=1)
        try:
            got = fn(mask.clone(), m)
        except Exception as exc:
            if _unwritten(exc):
                return _report(Verdict(False, PENDING_CODE, pending=True), quiet)
            return _report(Verdict(False, f"for a {tuple(mask.shape)} mask and m = {m}: " + _crash(exc)), quiet)
        problem = _tensor_verdict(got, want.shape, f"for a {tuple(mask.shape)} mask and m = {m} the result must be")
        if problem is not None:
            return _report(problem, quiet)
        if not torch.equal(got.to(want.dtype), want):
            return _report(Verdict(False, f"for {mask.long().tolist()} and m = {m}: got {got.long().tolist()}; the "
                                          "prompt columns come first and are always attended, the padding stays "
                                          "hidden"), quiet)
        if got.dtype != mask.dtype:
            return _report(Verdict(False, f"the mask came in as {mask.dtype} and left as {got.dtype}: keep its dtype"),
                           quiet)
    return _report(Verdict(True, "right for left and right padding, m below, equal to and above T, and m = 0"), quiet)


# -- numeric answers whose formulas stay out of the notebooks ---------------------------------------
def _bert_parameters(V: int, P: int, T: int, d: int, f: int, L: int) -> int:
    embeddings = (V + P + T + 2) * d  # word, position, token type; LayerNorm weight and bias
    layer = 4 * (d * d + d) + (2 * d * f + f + d) + 4 * d  # q, k, v, o; feed-forward; two LayerNorms
    return embeddings + L * layer + d * d + d  # + pooler


def _llama_layer(d: int, f: int, head_dim: int, kv_heads: int) -> int:
    return 2 * d * d + 2 * d * kv_heads * head_dim + 3 * d * f + 2 * d  # q, o; k, v; gate/up/down; 2 RMSNorms


def _pfeiffer_matching_lora(d: int, r: int) -> int:
    lora = 2 * r * (2 * d)  # query and value, r (d_in + d_out) each, per layer
    return min(range(1, d + 1), key=lambda b: abs((2 * d * b + b + d) - lora))


def _answers() -> dict[str, tuple[float, float, str]]:
    """key -> (expected, relative tolerance (0: exact), hint). The formulas live here, not in the notebooks."""
    spectrum = [6.0, 4.0, 3.0, 2.0, 1.0]
    minilm_act = 4 * 32 * 256 * 6 * (10 * 384 + 2 * 1536 + 3 * 12 * 256) / 1e6
    return {
        "bert-base-parameters": (_bert_parameters(30522, 512, 2, 768, 3072, 12), 0.0,
                                 "embeddings (with their LayerNorm), 12 layers (every matrix with its bias, two "
                                 "LayerNorms each) and the pooler"),
        "smollm2-layer-with-mha": (_llama_layer(576, 1536, 64, 9), 0.0,
                                   "with 9 key/value heads k_proj and v_proj are as large as q_proj; add the "
                                   "three feed-forward matrices and the two RMSNorm weights"),
        "adam-states-13b-gb": (16 * 13e9 / 1e9, 0.01, "per parameter: fp32 weight, fp32 gradient, two fp32 Adam "
                                                       "moments"),
        "minilm-activations-32x256-mb": (minilm_act, 0.01, "apply the activation formula with B = 32, T = 256 "
                                                           "(the attention term grows with T squared)"),
        "rank2-error-of-6-4-3-2-1": (sum(x * x for x in spectrum[2:]) ** 0.5, 1e-3,
                                     "the error is the root of the sum of the squared singular values left out"),
        "rank2-energy-of-6-4-3-2-1": (sum(x * x for x in spectrum[:2]) / sum(x * x for x in spectrum), 1e-3,
                                      "energy is measured with squared singular values"),
        "minilm-lora-r4-all-six-maps": (6 * (4 * 4 * (384 + 384) + 2 * 4 * (384 + 1536)), 0.0,
                                        "not every matrix is square: r (d_in + d_out) for each of the six maps, "
                                        "in each of the 6 layers"),
        "minilm-lora-qv-r4-with-head": (6 * 2 * 4 * (384 + 384) + 384 * 2 + 2, 0.0,
                                        "A and B of query and value in each of the 6 layers, plus the head"),
        "minilm-lora-qv-r8-with-head": (6 * 2 * 8 * (384 + 384) + 384 * 2 + 2, 0.0,
                                        "A and B of query and value in each of the 6 layers, plus the head"),
        "smollm2-houlsby-b64": ((2 * 576 * 64 + 64 + 576) * 2 * 30, 0.0,
                                "two adapters per layer, each with two matrices and two bias vectors"),
        "minilm-pfeiffer-b-matching-lora-r16": (_pfeiffer_matching_lora(384, 16), 0.0,
                                                "one adapter per layer against LoRA r = 16 on two 384 x 384 maps"),
        "minilm-houlsby-b16-macs-per-token": (2 * 6 * (2 * 16 * 384), 0.0,
                                              "two adapters in each of 6 layers, two b x d products each"),
        "merged-lora-macs-per-token": (0, 0.0, "after merging, what is left of the branch?"),
        "adamw-decay-left": ((1 - 1e-3 * 0.1) ** 1000, 1e-3,
                             "AdamW multiplies each weight by (1 - lr * weight_decay) once per step"),
        "smollm2-flat-prefix-gqa": (2 * 30 * 10 * 3 * 64, 0.0, "keys and values, in every layer, per key/value head"),
        "smollm2-flat-prefix-mha": (2 * 30 * 10 * 9 * 64, 0.0, "keys and values, in every layer, per key/value head"),
    }


def check_value(key: str, answer, quiet: bool = False) -> Verdict:
    """Compare a numeric ``answer`` with the expected value stored under ``key`` (see ``_answers``)."""
    table = _answers()
    if key not in table:
        raise KeyError(f"no exercise {key!r}: known ones are {sorted(table)}")
    expected, rel, hint = table[key]
    if answer is None:
        return _report(Verdict(False, PENDING_VALUE, pending=True), quiet)
    if not isinstance(answer, (int, float)) or isinstance(answer, bool):
        return _report(Verdict(False, f"the answer must be a number, got {type(answer).__name__}"), quiet)
    ok = abs(answer - expected) <= rel * abs(expected) if rel else answer == expected
    if ok and isinstance(expected, int) and not rel and not isinstance(answer, int) and answer != int(answer):
        ok = False
    if ok:
        return _report(Verdict(True, f"{answer:,}" if isinstance(answer, int) else f"{answer:.4g}"), quiet)
    side = "too large" if answer > expected else "too small"
    return _report(Verdict(False, f"{answer:,} is {side}; {hint}"), quiet)


# -- merging a LoRA update, and reading an attention map -------------------------------------------
def check_merge(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(W, A, B, alpha, r)`` must return the merged weight W + (alpha / r) B A for W (out, in),
    A (r, in), B (out, r): checked against ``peftlab.lora.LoRALinear.merge`` on non-square layers."""
    from peftlab.lora import LoRALinear

    for d_in, d_out, r, alpha in ((6, 4, 2, 3.0), (5, 9, 1, 16.0), (8, 8, 4, 4.0)):
        torch.manual_seed(d_in * 10 + r)
        layer = LoRALinear(nn.Linear(d_in, d_out))
        layer.add_adapter("default", r=r, alpha=alpha)
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_()
        W = layer.base_layer.weight.detach().clone()
        A, B = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
        try:
            got = fn(W.clone(), A, B, alpha, r)
        except Exception as exc:
            if _unwritten(exc):
                return _report(Verdict(False, PENDING_CODE, pending=True), quiet)
            return _report(Verdict(False, f"for a {d_in} -> {d_out} layer with r = {r}: " + _crash(exc)
                                   + (" -- an (out, in) update comes from an (out, r) times an (r, in) matrix"
                                      if "shape" in str(exc) or "size" in str(exc) else "")), quiet)
        layer.merge(["default"])
        want = layer.base_layer.weight.detach()
        problem = _tensor_verdict(got, W.shape, "the merged weight must keep W's shape")
        if problem is not None:
            return _report(problem, quiet)
        if torch.allclose(got, want, atol=1e-6):
            continue
        if torch.allclose(got, W + B @ A, atol=1e-6):
            msg = f"the update is not scaled (alpha = {alpha}, r = {r})"
        elif torch.allclose(got, W, atol=1e-7):
            msg = "W came back unchanged: the update was not added"
        else:
            msg = f"the values differ from LoRALinear.merge for a {d_in} -> {d_out} layer, r = {r}, alpha = {alpha}"
        return _report(Verdict(False, msg), quiet)
    return _report(Verdict(True, "matches LoRALinear.merge on every layer shape tried"), quiet)


def check_attention_share(maps, answer, layer: int = 3, head: int = 0, token: str = "superb",
                          quiet: bool = False) -> Verdict:
    """``answer`` must be the share of ``token``'s attention (``maps``: ``peftlab.viz.AttentionMaps``) that goes
    to the first and last tokens ([CLS], [SEP]) in ``layer``/``head``, to two decimals."""
    if answer is None:
        return _report(Verdict(False, PENDING_VALUE, pending=True), quiet)
    row = maps.attentions[layer][head, maps.tokens.index(token)]
    expected = float(row[0] + row[-1])
    if not isinstance(answer, (int, float)) or isinstance(answer, bool):
        return _report(Verdict(False, f"the answer must be a number, got {type(answer).__name__}"), quiet)
    if abs(answer - expected) <= 0.011:
        return _report(Verdict(True, f"{expected:.2f}"), quiet)
    col = maps.attentions[layer][head, :, maps.tokens.index(token)]
    if abs(answer - float(col[0] + col[-1])) <= 0.011:
        return _report(Verdict(False, "that is what [CLS] and [SEP] give to the token: read the token's own row"),
                       quiet)
    return _report(Verdict(False, f"{answer} is off: the row of {token!r} in layer {layer}, head {head}, columns "
                                  "of [CLS] and [SEP]"), quiet)
