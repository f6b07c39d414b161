"""Checkers for the notebooks' exercises: the student writes code, the checker runs it.

Each checker calls the student's function on several random shapes and edge cases, compares
with a float64 reference computed here, and prints ``right`` or ``wrong`` with a hint that
names the symptom (never the answer). It returns True or False, so a notebook cell can also
``assert`` it. The tests (``tests/test_exercises.py``) hold worked solutions, which must pass,
and the typical wrong answers, which must fail.
"""

from __future__ import annotations

import functools
import traceback
from typing import Callable

import torch
from torch import nn

__all__ = ["check_lora_forward", "check_replace_linears", "check_schedule", "check_prompt_mask", "check_value",
           "check_merge", "check_attention_share", "check_gpt2_count", "check_state_bytes", "check_svd_factors",
           "check_adapter", "check_heatmap", "check_lora_count", "check_prefix_count", "check_nf4_quantize",
           "check_dora_weight", "Verdict"]


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


def _run_answer(fn: Callable, *args, where: str = "") -> tuple[object, Verdict | None]:
    """Call the student's ``fn(*args)``: ``(result, None)``, or ``(None, verdict)`` -- "not answered yet"
    when it returns None or raises ``NotImplementedError``, "wrong" with the failing line for any other
    error (``where`` says for which case)."""
    try:
        got = fn(*args)
    except Exception as exc:  # the student's code: any error is a finding, not a crash of the checker
        if _unwritten(exc):
            return None, Verdict(False, PENDING_CODE, pending=True)
        return None, Verdict(False, (f"{where}: " if where else "") + _crash(exc))
    if got is None:
        return None, Verdict(False, PENDING_CODE, pending=True)
    return got, None


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
        "smollm2-layer-with-mha": (_llama_layer(576, 1536, 64, 9), 0.0,
                                   "with 9 key/value heads k_proj and v_proj are as large as q_proj; add the "
                                   "three feed-forward matrices and the two RMSNorm weights"),
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
        "smollm2-houlsby-b64": ((2 * 576 * 64 + 64 + 576) * 2 * 30, 0.0,
                                "two adapters per layer, each with two matrices and two bias vectors"),
        "minilm-pfeiffer-b-matching-lora-r16": (_pfeiffer_matching_lora(384, 16), 0.0,
                                                "one adapter per layer against LoRA r = 16 on two 384 x 384 maps"),
        "minilm-houlsby-b16-macs-per-token": (2 * 6 * (2 * 16 * 384), 0.0,
                                              "two adapters in each of 6 layers, two b x d products each"),
        "merged-lora-macs-per-token": (0, 0.0, "after merging, what is left of the branch?"),
        "nf4-bits-block128-double-quant": (4 + 8 / 128 + 32 / (128 * 256), 1e-4,
                                           "4 bits per code, plus each block's int8 absmax shared by 128 weights, "
                                           "plus one fp32 scale per 256 absmax values"),
        "smollm2-ia3-default-params": (30 * (3 * 64 + 3 * 64 + 1536), 0.0,
                                       "keys and values are num_key_value_heads x head_dim wide; down_proj is "
                                       "scaled on its input"),
        "adamw-decay-left": ((1 - 1e-3 * 0.1) ** 1000, 1e-3,
                             "AdamW multiplies each weight by (1 - lr * weight_decay) once per step"),
        "prefix-gate-one-slot-ln3": (3 / (3 + 2), 1e-3, "the gate is Z_P / (Z_P + Z_K), and Z_K adds up the "
                                                         "exponentials of every real key's score"),
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


# -- parameter counts from a model's config -----------------------------------------------------------
def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _call_counter(fn: Callable, config) -> tuple[int | None, Verdict | None]:
    """Run the student's counter; (answer, None) or (None, the verdict to report)."""
    got, problem = _run_answer(fn, config)
    if problem is not None:
        return None, problem
    if isinstance(got, bool) or not isinstance(got, int) and not (isinstance(got, float) and got == int(got)):
        return None, Verdict(False, f"return a whole number of parameters, got {got!r}")
    return int(got), None


@functools.lru_cache(maxsize=1)
def _gpt2_references() -> tuple:
    """(config, parameter count of the real GPT2Model) for two made-up configurations and GPT-2 small."""
    from transformers import GPT2Config, GPT2Model

    configs = (GPT2Config(vocab_size=50, n_positions=20, n_embd=12, n_layer=2, n_head=3, bos_token_id=0,
                          eos_token_id=0),
               GPT2Config(vocab_size=31, n_positions=9, n_embd=8, n_layer=3, n_head=2, n_inner=20, bos_token_id=0,
                          eos_token_id=0),
               GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12))  # GPT-2 small
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return tuple((c, _count(GPT2Model(c))) for c in configs)


def check_gpt2_count(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(config)`` must return the parameter count of ``GPT2Model(config)`` from the fields of a
    ``transformers.GPT2Config`` (``n_inner`` None means 4 * n_embd): compared with the real module on two
    made-up configurations and on GPT-2 small, so a number tuned to one model fails."""
    for config, want in _gpt2_references():
        got, problem = _call_counter(fn, config)
        if problem is not None:
            return _report(problem, quiet)
        if got == want:
            continue
        d, L = config.n_embd, config.n_layer
        f = config.n_inner or 4 * d
        known = {2 * d: "the final LayerNorm (ln_f) is missing",
                 -(d * d + d): "GPT-2 has no pooler",
                 -4 * d: "GPT-2 has no token-type embeddings and no LayerNorm right after the embeddings",
                 L * 4 * d: "each block has two LayerNorms, each with a weight and a bias",
                 L * (5 * d + f): "the linear layers have biases (the fused q/k/v layer has 3 d of them)"}
        if config.n_inner:
            known[L * (f - 4 * d) * (2 * d + 1)] = "the feed-forward width is n_inner when it is set"
        hint = known.get(want - got, f"off by {want - got:+,}: token and position embeddings; per block two "
                                     "LayerNorms, the fused q/k/v layer, the output projection and the MLP pair, "
                                     "all with biases; one final LayerNorm")
        return _report(Verdict(False, f"n_embd={d}, {L} blocks, vocab {config.vocab_size}: {got:,} is "
                                      f"{'too small' if got < want else 'too large'}; {hint}"), quiet)
    return _report(Verdict(True, f"equals GPT2Model's parameter count on three configurations, GPT-2 small's "
                                 f"included ({want:,})"), quiet)


# -- the memory of the model states ----------------------------------------------------------------------
def _held_bytes(n_total: int, trainable_layers: int) -> tuple[int, int, int]:
    """(bytes of weights, gradients and AdamW moments after one real step, N, trainable N) on a small MLP."""
    torch.manual_seed(trainable_layers)
    model = nn.Sequential(*(nn.Linear(n_total, n_total) for _ in range(4)))
    for layer in list(model)[trainable_layers:]:
        layer.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    model(torch.randn(2, n_total)).sum().backward()
    optimizer.step()
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    held += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    held += sum(v.numel() * v.element_size() for st in optimizer.state.values() for k, v in st.items() if k != "step")
    return held, sum(p.numel() for p in model.parameters()), sum(p.numel() for p in trainable)


def check_state_bytes(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(n_total, n_trainable)`` must return the bytes of fp32 model states that AdamW training holds
    when ``n_trainable`` of ``n_total`` parameters train: compared with the tensors PyTorch really holds
    after one step (weights, gradients, moments) with every layer, some layers and one layer trainable."""
    for width, layers in ((6, 4), (9, 1), (5, 3)):  # all, a quarter, three quarters trainable
        held, n, k = _held_bytes(width, layers)
        got, problem = _run_answer(fn, n, k)
        if problem is not None:
            return _report(problem, quiet)
        if got == held:
            continue
        known = {16 * n: "frozen parameters get no gradient and no Adam moments",
                 16 * k: "the frozen weights are still in memory: the forward pass needs them",
                 4 * n + 8 * k: "each trainable parameter also has a gradient",
                 4 * n + 4 * k: "AdamW keeps two moments per trainable parameter"}
        hint = known.get(got, "count the bytes of every tensor PyTorch holds after one step")
        return _report(Verdict(False, f"{k:,} of {n:,} parameters trainable: PyTorch holds {held:,} bytes, you "
                                      f"said {got:,}; {hint}"), quiet)
    return _report(Verdict(True, "equals the bytes PyTorch holds after a real AdamW step, frozen layers "
                                 "included"), quiet)


# -- a weight update compressed into LoRA's two factors ------------------------------------------------
def check_svd_factors(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(W, r)`` must return LoRA factors ``(B, A)``, B (m, r) and A (r, n), whose product is the best
    rank-``r`` approximation of ``W`` (the truncated SVD), with the singular values in B and orthonormal rows
    in A (A A^T = I): checked on tall, wide and square float64 matrices, r = 1 to full rank."""
    g = torch.Generator().manual_seed(5)
    for m, n, r in ((8, 5, 2), (4, 9, 1), (6, 6, 6), (10, 7, 3)):
        W = torch.randn(m, n, generator=g, dtype=torch.float64)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        where = f"for a {m} x {n} matrix and r = {r}"
        got, problem = _run_answer(fn, W.clone(), r, where=where)
        if problem is not None:
            return _report(problem, quiet)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            return _report(Verdict(False, f"return the pair (B, A), got {type(got).__name__}"), quiet)
        B, A = got
        for name, tensor, shape in (("B", B, (m, r)), ("A", A, (r, n))):
            problem = _tensor_verdict(tensor, shape, f"{where}, {name} must be")
            if problem is not None:
                return _report(problem, quiet)
        B, A = B.double(), A.double()
        product = B @ A
        if not torch.allclose(product, best, atol=1e-8):
            error, optimum = float(torch.linalg.matrix_norm(W - product)), float(S[r:].square().sum().sqrt())
            if torch.allclose(product, U[:, :r] @ Vh[:r], atol=1e-8):
                msg = "B A is missing the singular values"
            elif error > optimum + 1e-9:
                msg = (f"W - B A has error {error:.3f}, the best possible is {optimum:.3f}: keep the r largest "
                       "singular values (torch.linalg.svd returns them in descending order) and the matching "
                       "columns of U and rows of Vh")
            else:
                msg = "B A is not the truncated SVD"
            return _report(Verdict(False, f"{where}: {msg}"), quiet)
        if not torch.allclose(A @ A.T, torch.eye(r, dtype=A.dtype), atol=1e-8):
            return _report(Verdict(False, f"{where}: B A is right, but A's rows are not orthonormal: put the singular "
                                          "values into B and keep A = the first r rows of Vh"), quiet)
    return _report(Verdict(True, "B A is the truncated SVD and A has orthonormal rows, on every shape and rank "
                                 "tried"), quiet)


# -- a bottleneck adapter ----------------------------------------------------------------------------------
def check_adapter(make: Callable, quiet: bool = False) -> Verdict:
    """``make(d, b)`` must return a module with ``down`` = nn.Linear(d, b) and ``up`` = nn.Linear(b, d)
    whose forward is h + up(relu(down(h))), equal to h at initialisation and able to learn from the first step."""
    for d, b in ((12, 3), (7, 2), (384, 16)):
        torch.manual_seed(d + b)
        adapter, problem = _run_answer(make, d, b, where=f"make({d}, {b})")
        if problem is not None:
            return _report(problem, quiet)
        down, up = getattr(adapter, "down", None), getattr(adapter, "up", None)
        if not isinstance(down, nn.Linear) or not isinstance(up, nn.Linear):
            return _report(Verdict(False, "the module needs two nn.Linear attributes, down and up"), quiet)
        if tuple(down.weight.shape) != (b, d) or tuple(up.weight.shape) != (d, b):
            return _report(Verdict(False, f"for d = {d}, b = {b}: down maps d -> b (weight {(b, d)}) and up b -> d "
                                          f"(weight {(d, b)}); got {tuple(down.weight.shape)} and "
                                          f"{tuple(up.weight.shape)} -- an adapter is sized by the width of the "
                                          "hidden state it reads"), quiet)
        if _count(adapter) != 2 * d * b + b + d:
            return _report(Verdict(False, f"{_count(adapter):,} parameters for d = {d}, b = {b}: two matrices and "
                                          "two bias vectors, nothing else"), quiet)
        h = torch.randn(3, 5, d)
        try:
            out = adapter(h)
        except Exception as exc:
            return _report(Verdict(False, f"forward on a (3, 5, {d}) input: " + _crash(exc)), quiet)
        problem = _tensor_verdict(out, h.shape, "the output keeps the input's shape")
        if problem is not None:
            return _report(problem, quiet)
        if not torch.allclose(out, h, atol=1e-6):
            return _report(Verdict(False, "a fresh adapter changes its input: start up (weight and bias) at zero so "
                                          "the model begins exactly as pretrained"), quiet)
        if not out.requires_grad:
            return _report(Verdict(False, "the output does not depend on down and up: nothing could learn"), quiet)
        (out * torch.randn_like(out)).sum().backward()
        if up.weight.grad is None or not up.weight.grad.abs().sum() > 0:
            return _report(Verdict(False, "up gets no gradient at the first step: with up = 0, its gradient is "
                                          "relu(down(h)), so down must not start at zero"), quiet)
        with torch.no_grad():
            up.weight.normal_()
            up.bias.normal_()
            down.bias.normal_()
            out = adapter(h)
            branch = _linear(torch.relu(_linear(h, down)), up)
        if torch.allclose(out, h + branch, atol=1e-4):
            continue
        if torch.allclose(out, branch, atol=1e-4):
            msg = "the skip connection is missing: return h + branch"
        elif torch.allclose(out, h + _linear(_linear(h, down), up), atol=1e-4):
            msg = "the non-linearity is missing: relu between down and up"
        else:
            msg = "the output is not h + up(relu(down(h)))"
        return _report(Verdict(False, f"d = {d}, b = {b}: {msg}"), quiet)
    return _report(Verdict(True, "h + up(relu(down(h))): identity at init, learns from step one, 2db + b + d "
                                 "parameters"), quiet)


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


# -- an attention heatmap of your own --------------------------------------------------------------------
def check_heatmap(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(ax, weights, tokens)`` must draw the (T, T) attention map ``weights`` (rows: queries, columns:
    keys) on the matplotlib axes ``ax`` with ``ax.imshow``, every token as a tick label on both axes and the
    colour scale fixed to 0..1 (so that heads can be compared)."""
    from matplotlib.figure import Figure

    g = torch.Generator().manual_seed(9)
    for tokens in (["[CLS]", "not", "good", "at", "all", "[SEP]"], ["[CLS]", "superb", "[SEP]"]):
        T = len(tokens)
        weights = torch.softmax(3 * torch.randn(T, T, generator=g), dim=-1)  # rows sum to 1, not symmetric
        ax = Figure(figsize=(4, 4)).add_subplot()
        try:
            fn(ax, weights.clone(), list(tokens))
        except Exception as exc:
            if _unwritten(exc):
                return _report(Verdict(False, PENDING_CODE, pending=True), quiet)
            return _report(Verdict(False, f"for {T} tokens: " + _crash(exc)), quiet)
        if not ax.images:
            return _report(Verdict(False, PENDING_CODE if not ax.has_data() else
                                   "no image on the axes: draw the map with ax.imshow", pending=not ax.has_data()),
                           quiet)
        shown = torch.as_tensor(ax.images[-1].get_array().data, dtype=torch.float32)
        if tuple(shown.shape) != (T, T):
            return _report(Verdict(False, f"the image is {tuple(shown.shape)}, the map is {(T, T)}"), quiet)
        if not torch.allclose(shown, weights, atol=1e-6):
            msg = ("the map is transposed: row i must be query i's distribution over the keys"
                   if torch.allclose(shown, weights.T, atol=1e-6) else "the image does not show the weights as given")
            return _report(Verdict(False, msg), quiet)
        x_labels = [t.get_text() for t in ax.get_xticklabels()]
        y_labels = [t.get_text() for t in ax.get_yticklabels()]
        if x_labels != tokens or y_labels != tokens:
            which = "x (keys)" if x_labels != tokens else "y (queries)"
            return _report(Verdict(False, f"the {which} tick labels read {x_labels if x_labels != tokens else y_labels}"
                                          f": put every token at its position (ax.set_xticks(range(T), tokens))"),
                           quiet)
        if tuple(float(v) for v in ax.images[-1].get_clim()) != (0.0, 1.0):
            return _report(Verdict(False, f"the colour scale runs {tuple(round(float(v), 3) for v in ax.images[-1].get_clim())}"
                                          ": fix it to vmin=0, vmax=1 so two heads' maps can be compared"), quiet)
    return _report(Verdict(True, "queries as rows, keys as columns, every token labelled, colours fixed to 0..1"),
                   quiet)


# -- LoRA's parameter count, from the model's layers ---------------------------------------------------
def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=6, num_key_value_heads=2, head_dim=4))


def check_lora_count(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(model, r, targets)`` must return how many parameters LoRA of rank ``r`` adds to every
    ``nn.Linear`` whose own name (the part after the last dot) is in ``targets``: compared with what
    ``peftlab.inject`` creates, on a BERT and on a Llama with grouped-query attention (non-square k and v)."""
    import copy

    from peftlab.config import LoRAConfig
    from peftlab.inject import count_parameters, inject

    cases = [(_tiny_bert(), 4, ("query", "value")), (_tiny_bert(), 2, ("query", "key", "value")),
             (_tiny_llama(), 8, ("q_proj", "v_proj")),
             (_tiny_llama(), 3, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))]
    for model, r, targets in cases:
        injected = inject(copy.deepcopy(model), LoRAConfig(r=r, alpha=2 * r, target_modules=targets))
        want = count_parameters(injected).by_kind["lora"]
        before = {k: v.clone() for k, v in model.state_dict().items()}
        got, problem = _run_answer(fn, model, r, targets, where=f"{type(model).__name__}, r = {r}, {targets}")
        if problem is not None:
            return _report(problem, quiet)
        if set(model.state_dict()) != set(before):
            return _report(Verdict(False, "count, do not change the model: it has new parameters now"), quiet)
        if got != want:
            square = "; k_proj and v_proj are not square here (grouped-query attention): r (d_in + d_out)" \
                if "k_proj" in targets or "v_proj" in targets else ": r (d_in + d_out) per matched layer"
            return _report(Verdict(False, f"{type(model).__name__}, r = {r}, targets {targets}: {got:,} "
                                          f"{'too small' if got < want else 'too large'}{square}"), quiet)
    return _report(Verdict(True, "equals what peftlab.inject adds, on BERT and on a grouped-query Llama"), quiet)


# -- the size of a flat prefix -----------------------------------------------------------------------
def _llama_configs():
    from transformers import LlamaConfig

    common = {"vocab_size": 64, "intermediate_size": 40}
    yield LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, **common)
    yield LlamaConfig(hidden_size=24, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, **common)
    yield LlamaConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      **common)  # head_dim is not hidden_size / heads


def check_prefix_count(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(config, m)`` must return how many values a flat prefix of ``m`` virtual tokens holds in a Llama
    model with ``config`` (a ``transformers.LlamaConfig``): compared with what ``peftlab.inject`` creates on
    models with and without grouped-query attention, one with ``head_dim`` set apart from hidden_size / heads,
    and with SmolLM2's count."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab.config import PrefixConfig
    from peftlab.inject import count_parameters, inject

    cases = []
    for config in _llama_configs():
        torch.manual_seed(0)
        model = inject(LlamaForCausalLM(copy.deepcopy(config)), PrefixConfig(num_virtual_tokens=3, projection=False,
                                                                              init="random"))
        cases.append((config, 3, count_parameters(model).by_kind["prefix"]))
    smol = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       head_dim=64, intermediate_size=1536)
    cases.append((smol, 10, 2 * 30 * 10 * 3 * 64))  # keys and values, layers, tokens, key/value heads, width
    for config, m, want in cases:
        got, problem = _run_answer(fn, copy.deepcopy(config), m)
        if problem is not None:
            return _report(problem, quiet)
        if got == want:
            continue
        L, H, K = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
        hd = config.head_dim
        known = {want // L: "every layer has its own prefix",  # later entries win where two coincide
                 want * H // K: "only the key/value heads get prefix entries, num_key_value_heads x head_dim wide",
                 2 * L * m * config.hidden_size: "the key/value width is num_key_value_heads x head_dim, "
                                                 "not hidden_size",
                 want // 2: "a prefix holds keys and values"}
        if got in known and not (got == want * H // K and H == K):
            hint = known[got]
        else:
            hint = "count keys and values, in every layer, for every key/value head, each head_dim wide"
        return _report(Verdict(False, f"{L} layers, {H} query / {K} key-value heads of width {hd}, m = {m}: "
                                      f"{got:,} is {'too small' if got < want else 'too large'}; {hint}"), quiet)
    return _report(Verdict(True, "equals what peftlab.inject creates, with and without grouped-query attention, "
                                 "and SmolLM2's count"), quiet)


# -- NF4: block-wise absmax and the nearest code value (notebook 06) -----------------------------------
def check_nf4_quantize(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(w, code, block_size)`` must return ``(idx, absmax)`` for a 1-D float weight ``w`` (n,), n a multiple of
    ``block_size``, and the 16 sorted NF4 values ``code``: ``absmax`` (n / block_size,) the largest |w| of each block,
    ``idx`` (n,) integer, the index of the code value nearest to w / absmax of its block (an all-zero block: the
    index of 0). Compared with ``peftlab.quant.quantize_nf4`` (no double quantization) on weights with outliers."""
    from .quant import nf4_code, quantize_nf4

    code = nf4_code()
    g = torch.Generator().manual_seed(4)
    for n, block in ((64, 64), (256, 64), (96, 32), (128, 16)):
        w = torch.randn(n, generator=g) * 0.02
        w[n // 3] = 0.5  # an outlier: with one scale for the whole tensor it flattens every other block
        if n >= 2 * block:
            w[-block:] = 0.0  # an all-zero block
        ref = quantize_nf4(w, block_size=block, double_quant=False)
        want_idx = torch.stack([ref.packed >> 4, ref.packed & 0x0F], dim=1).reshape(-1).long()  # (n,)
        where = f"for n = {n}, block_size = {block}"
        got, problem = _run_answer(fn, w.clone(), code.clone(), block, where=where)
        if problem is not None:
            return _report(problem, quiet)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            return _report(Verdict(False, f"return the pair (idx, absmax), got {type(got).__name__}"), quiet)
        idx, absmax = got
        for name, tensor, shape in (("idx", idx, (n,)), ("absmax", absmax, (n // block,))):
            problem = _tensor_verdict(tensor, shape, f"{where}, {name} must be")
            if problem is not None:
                return _report(problem, quiet)
        if idx.is_floating_point():
            return _report(Verdict(False, "idx must hold integer code indices (0..15), not the code values"), quiet)
        if not torch.allclose(absmax.float(), ref.absmax, rtol=1e-6, atol=0):
            if torch.allclose(absmax.float(), torch.full_like(ref.absmax, float(w.abs().max()))):
                msg = "every block got the same scale: take the absolute maximum of each block on its own"
            elif torch.allclose(absmax.float(), w.view(-1, block).amax(1)):
                msg = "absmax is the largest |w|, not the largest w (a block's extreme can be negative)"
            else:
                msg = "absmax must be each block's largest |w|, blocks of block_size consecutive values"
            return _report(Verdict(False, f"{where}: {msg}"), quiet)
        wrong = idx.long() != want_idx
        if wrong.any():
            x = w.view(-1, block) / torch.where(ref.absmax == 0, 1.0, ref.absmax)[:, None]
            gap = (x.reshape(-1)[:, None] - code).abs()  # (n, 16) distance to every code value
            two = gap.sort(dim=1).values
            tie = (two[:, 1] - two[:, 0]) < 1e-6  # equally near two code values: either index is right
            if (wrong & ~tie).any():
                k = int((wrong & ~tie).nonzero()[0])
                if idx.min() < 0 or idx.max() > 15:
                    msg = "indices must lie in 0..15 (positions in the code book)"
                else:
                    msg = (f"element {k}: w / absmax = {float(x.reshape(-1)[k]):.4f} is nearest to code value "
                           f"{float(code[want_idx[k]]):.4f}, not {float(code[idx[k].clamp(0, 15)]):.4f}: pick the "
                           "nearest of the 16 NF4 values (they are not evenly spaced)")
                return _report(Verdict(False, f"{where}, {msg}"), quiet)
    return _report(Verdict(True, "same indices and block scales as peftlab.quant.quantize_nf4"), quiet)


# -- DoRA's adapted weight (notebook 06) ---------------------------------------------------------------
def check_dora_weight(fn: Callable, quiet: bool = False) -> Verdict:
    """``fn(W, A, B, m, scale)`` must return DoRA's adapted weight W' = m * V / ||V||, V = W + scale * B A, the
    norm of each output row (over the inputs), for W (out, in), A (r, in), B (out, r), m (out,): compared with
    ``peftlab.lora.LoRALinear.dora_weight`` on non-square layers."""
    from .lora import LoRALinear

    for d_in, d_out, r, alpha in ((6, 4, 2, 4.0), (5, 9, 1, 16.0), (8, 8, 4, 4.0)):
        torch.manual_seed(d_in * 10 + r)
        layer = LoRALinear(nn.Linear(d_in, d_out))
        layer.add_adapter("default", r=r, alpha=alpha, use_dora=True)
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_()
            layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(d_out) + 0.5)
        W = layer.base_layer.weight.detach().clone()
        A, B = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
        m = layer.lora_magnitude_vector["default"].weight.detach().clone()
        s = float(layer.scaling["default"])
        where = f"for a {d_in} -> {d_out} layer, r = {r}"
        got, problem = _run_answer(fn, W.clone(), A, B, m.clone(), s, where=where)
        if problem is not None:
            return _report(problem, quiet)
        problem = _tensor_verdict(got, W.shape, f"{where}, W' must keep W's shape")
        if problem is not None:
            return _report(problem, quiet)
        want = layer.dora_weight("default")
        if torch.allclose(got.float(), want, atol=1e-5):
            continue
        V = W + s * B @ A
        slips = [(m[:, None] * V / V.norm(dim=0, keepdim=True), "the norm is per output row (over the inputs, "
                                                                "dim=1): one length per output feature, like m"),
                 (m[:, None] * V / W.norm(dim=1, keepdim=True), "divide by the norm of the adapted W + s B A, "
                                                                "not of W"),
                 (m[:, None] * (W + B @ A) / (W + B @ A).norm(dim=1, keepdim=True), "the update is scale * B A"),
                 (V / V.norm(dim=1, keepdim=True), "the unit-length rows still need their magnitude m"),
                 (m[:, None] * W / W.norm(dim=1, keepdim=True) + s * B @ A,
                  "normalise the whole W + s B A, then scale it by m")]
        hint = next((h for slip, h in slips if torch.allclose(got.float(), slip, atol=1e-5)),
                    "W' = m * (W + s B A) / ||W + s B A||, the norm of each row")
        return _report(Verdict(False, f"{where}: {hint}"), quiet)
    return _report(Verdict(True, "equals peftlab's DoRA weight on three layer shapes"), quiet)
