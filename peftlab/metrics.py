"""Metrics, inference latency and peak memory, written once for the notebooks and the bench.

* Classification: accuracy, binary/macro F1 and ROC-AUC (scikit-learn), and
  ``evaluate_classifier`` which runs a model over a dataset and returns all three plus the loss.
* Generation: corpus BLEU with several references per sample (Papineni et al., 2002, via
  sacrebleu) and ROUGE-L F-measure (Lin, 2004, via rouge-score); ``generate_texts`` writes
  greedy continuations in batches.
* Language modelling: perplexity = exp(mean negative log-likelihood per predicted token), and
  next-token accuracy; with prompt tuning (Lester et al., 2021, ``peftlab.prompt``) the m
  logits of the virtual tokens are dropped first, so only real positions are scored.
* Evaluation never draws from the global random state (``rng_preserved``), so evaluating in
  the middle of training leaves the training run (dropout masks, data order) as it was.
* Cost: ``latency`` (median of timed calls after warm-up, synchronising CUDA) and
  ``PeakMemory`` (CUDA allocator peak on a GPU; sampled process RSS on the CPU; ``peak_rss_bytes``
  is the whole process lifetime's maximum, so comparisons run each case in its own process).

Explained in ``notebooks/07_training.ipynb`` (and used by ``peftlab bench``).
"""

from __future__ import annotations

import contextlib
import math
import random
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "accuracy", "f1", "roc_auc", "classification_metrics", "evaluate", "evaluate_classifier",
    "bleu", "rouge_l", "perplexity", "generate_texts", "latency", "PeakMemory", "peak_rss_bytes",
    "current_rss_bytes", "reset_peak_rss", "trim_heap", "rng_preserved",
]


# --- classification ---------------------------------------------------------------------

def _labels(y) -> np.ndarray:
    y = np.asarray(y.detach().cpu() if torch.is_tensor(y) else y)
    if y.size == 0:
        raise ValueError("no labels given: metrics need at least one example")
    return y


def accuracy(y_true, y_pred) -> float:
    """Fraction of predictions equal to the labels."""
    t, p = _labels(y_true), _labels(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true has shape {t.shape} but y_pred has shape {p.shape}")
    return float((t == p).mean())


def f1(y_true, y_pred, average: str | None = None) -> float:
    """F1 score; binary (positive class 1) for two classes, else macro-averaged."""
    from sklearn.metrics import f1_score

    t, p = _labels(y_true), _labels(y_pred)
    if average is None:
        average = "binary" if set(np.unique(np.concatenate([t, p]))) <= {0, 1} else "macro"
    return float(f1_score(t, p, average=average, zero_division=0))


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve; ``scores`` are P(class 1) (binary) or (N, C) probabilities."""
    from sklearn.metrics import roc_auc_score

    t, s = _labels(y_true), _labels(scores)
    if len(np.unique(t)) < 2:
        return float("nan")  # undefined with one class present
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    return float(roc_auc_score(t, s, multi_class="ovr") if s.ndim == 2 else roc_auc_score(t, s))


def classification_metrics(y_true, logits) -> dict[str, float]:
    """Accuracy, F1 and ROC-AUC from labels and (N, C) logits."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    probs = logits.softmax(-1).numpy()
    pred = probs.argmax(-1)
    return {"accuracy": accuracy(y_true, pred), "f1": f1(y_true, pred),
            "roc_auc": roc_auc(y_true, probs)}


# --- running a model over data ----------------------------------------------------------

class _Pad:
    """Stands in for a tokenizer where only ``pad_token_id`` is needed."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id


def as_loader(data, batch_size: int, *, shuffle: bool = False, seed: int = 0,
              pad_token_id: int = 0, group_by_length: bool = True):
    """A DataLoader over ``data``: returned as is if it is one, else a tokenised dataset.

    Tokenised datasets are batched by length (``peftlab.data.LengthGroupedBatches``):
    shuffled groups for training, longest-first for evaluation. The loader carries its own
    seeded generator, so iterating it never draws from torch's global random state (an
    evaluation in the middle of training leaves the training run's dropout masks as they were).
    """
    from torch.utils.data import DataLoader

    from peftlab.data import LengthGroupedBatches, PadCollator, sequence_lengths

    if isinstance(data, DataLoader):
        return data
    if data is None or len(data) == 0:
        raise ValueError("the data is empty: pass a tokenised dataset with at least one row "
                         "(peftlab.data.tokenize_classification) or a DataLoader")
    cols = getattr(data, "column_names", None)
    if cols is not None:
        missing = [c for c in ("input_ids", "labels") if c not in cols]
        if missing:
            hint = (" - it still has raw 'text': tokenise it with "
                    "peftlab.data.tokenize_classification(ds, tokenizer)" if "text" in cols else "")
            raise KeyError(f"the dataset lacks column(s) {missing}; it has {cols}{hint}")
        data = data.with_format("python")
    generator = torch.Generator().manual_seed(seed)
    collate = PadCollator(_Pad(pad_token_id))
    if group_by_length and cols is not None:
        batches = LengthGroupedBatches(sequence_lengths(data), batch_size, shuffle=shuffle, seed=seed)
        return DataLoader(data, batch_sampler=batches, generator=generator, collate_fn=collate)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=collate)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def rng_preserved():
    """Run the block, then put every global random state back as it was.

    torch's CPU generator and the generator of every CUDA device already in use, Python's
    ``random`` and NumPy's global state. Evaluation needs this: a DataLoader without its own
    ``generator`` draws its base seed from torch's global generator each time it is iterated
    (and so may a collator or a callback), and a training run that evaluates would then get
    other dropout masks and another data order than the same run without evaluation.
    """
    cpu = torch.get_rng_state()
    in_use = torch.cuda.is_available() and torch.cuda.is_initialized()  # else nothing on CUDA can draw
    cuda = torch.cuda.get_rng_state_all() if in_use else None
    py, npy = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        np.random.set_state(npy)


def token_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits of the real tokens: (B, T, V) for token labels (B, T).

    Prompt tuning (Lester et al., 2021; ``peftlab.prompt``) prepends m virtual tokens inside
    the model, so a causal LM returns (B, m + T, V) with the prompt's m positions first (the
    pre-hook also pads labels given to the model with m leading -100s). Those positions have
    no label of their own, so the first ``m = logits.shape[1] - T`` are dropped; without
    virtual tokens m = 0 and nothing changes.
    """
    extra = logits.shape[1] - labels.shape[1]
    if extra < 0:
        raise ValueError(f"the model returned {logits.shape[1]} positions for {labels.shape[1]} labels: "
                         "token labels must have one entry per input token (pad them with -100)")
    return logits[:, extra:]  # (B, T, V)


def predicts_next_token(model) -> bool:
    """Whether ``model``'s token logits at position t predict token t + 1 (a causal language model),
    rather than label token t itself (token classification, e.g. ``BertForTokenClassification``)."""
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel")) or bool(getattr(getattr(model, "config", None),
                                                                        "is_decoder", False))


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.inference_mode()
def evaluate(model, data, batch_size: int = 128, *, autocast_dtype=None,
             pad_token_id: int | None = None) -> dict[str, float]:
    """Loss and metrics of ``model`` on ``data`` (tokenised dataset or DataLoader).

    Classification (one label per row): ``loss``, ``accuracy``, ``f1``, ``roc_auc``.
    Causal LM (token labels, -100 ignored): ``loss`` = mean NLL per predicted token,
    ``perplexity`` = exp(loss) and ``token_accuracy`` (share of argmax predictions that hit the
    next token). Token classification (labels (B, T) on a model that is not a causal LM, see
    ``predicts_next_token``): the same three over each token's own label, unshifted.
    Any other label shape (multi-label, regression) raises ``ValueError``. A prompt-tuned model's virtual-token positions are not scored (``token_logits``).
    The global random states are the same afterwards as before (``rng_preserved``).
    """
    # around the whole call: the loader draws a seed, and even importing scikit-learn moves `random`
    with rng_preserved():
        return _evaluate(model, data, batch_size, autocast_dtype, pad_token_id)


def _evaluate(model, data, batch_size: int, autocast_dtype, pad_token_id: int | None) -> dict[str, float]:
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    loader = as_loader(data, batch_size, pad_token_id=pad_token_id)
    device = _device_of(model)
    causal = predicts_next_token(model)
    was_training = model.training
    model.eval()
    labels, logits, nll, tokens, hits = [], [], 0.0, 0, 0
    try:
        for batch in loader:
            batch = _to(batch, device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(**{k: v for k, v in batch.items() if k != "labels"})
            y = batch["labels"]
            if y.dim() == 1:  # classification
                labels.append(y.cpu())
                logits.append(out.logits.float().cpu())
                continue
            if out.logits.dim() != 3:
                raise ValueError(
                    f"labels shaped {tuple(y.shape)} with logits shaped {tuple(out.logits.shape)}: peftlab.evaluate "
                    "scores one class id per example (labels (B,)) or one token label per position (labels (B, T), "
                    "logits (B, T, V)); multi-label or regression targets need their own metric")
            if causal:  # shift so that the logits at token t score token t + 1
                z = token_logits(out.logits, y)[:, :-1].float()  # (B, T - 1, V)
                target = y[:, 1:]  # (B, T - 1)
            else:  # token classification: the logits at token t score token t's own label
                z = token_logits(out.logits, y).float()  # (B, T, C)
                target = y  # (B, T)
            mask = target != -100
            picked = z.log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T - 1)
            nll -= float(picked[mask].sum())
            hits += int((z.argmax(-1) == target)[mask].sum())
            tokens += int(mask.sum())
    finally:
        model.train(was_training)
    if labels:
        y, z = torch.cat(labels), torch.cat(logits)
        loss = float(torch.nn.functional.cross_entropy(z, y))
        return {"loss": loss, **classification_metrics(y.numpy(), z)}
    if tokens == 0:
        raise ValueError("no target tokens (every label is -100): nothing to evaluate")
    return {"loss": nll / tokens, "perplexity": math.exp(nll / tokens), "token_accuracy": hits / tokens}


def evaluate_classifier(model, data, batch_size: int = 128, **kwargs) -> dict[str, float]:
    """``evaluate`` for a sequence classifier: loss, accuracy, F1, ROC-AUC."""
    out = evaluate(model, data, batch_size, **kwargs)
    if "accuracy" not in out:
        raise ValueError("the data has token-level labels: this is a language-modelling set, "
                         "use peftlab.metrics.evaluate (perplexity) instead")
    return out


def perplexity(nll_per_token: Sequence[float] | torch.Tensor) -> float:
    """exp(mean NLL) over the predicted tokens."""
    values = torch.as_tensor(nll_per_token, dtype=torch.float64)
    if values.numel() == 0:
        raise ValueError("perplexity of zero tokens is undefined")
    return float(torch.exp(values.mean()))


# --- generation metrics -----------------------------------------------------------------

def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) with any number of references per hypothesis (sacrebleu).

    ``references[i]`` is the list of references of ``hypotheses[i]``; rows may differ in length.
    """
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("BLEU of an empty corpus is undefined")
    width = max(len(r) for r in references)
    if width == 0:
        raise ValueError("every hypothesis needs at least one reference")
    # sacrebleu wants one stream per reference position; pad short rows with None
    streams = [[r[i] if i < len(r) else None for r in references] for i in range(width)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F-measure (0-1); with several references, the best one counts."""
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need as many reference lists as hypotheses (> 0), got "
                         f"{len(hypotheses)} and {len(references)}")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    best = [max(scorer.score(ref, hyp)["rougeL"].fmeasure for ref in refs)
            for hyp, refs in zip(hypotheses, references)]
    return float(np.mean(best))


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 40,
                   batch_size: int = 8) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), without the prompt."""
    device = _device_of(model)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
    return [t.strip() for t in out]


# --- latency and memory -----------------------------------------------------------------

def latency(fn: Callable[[], object], repeats: int = 20, warmup: int = 3,
            device: torch.device | str | None = None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` timed calls after ``warmup`` untimed ones.

    On CUDA the device is synchronised around every call, since kernels run asynchronously.
    """
    if repeats <= 0 or warmup < 0:
        raise ValueError(f"repeats must be > 0 and warmup >= 0, got {repeats} and {warmup}")
    cuda = device is not None and torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started.

    Linux: ``VmHWM`` from ``/proc/self/status``, the peak of this program's own memory map.
    (``ru_maxrss`` survives ``exec``: a child started by a 2 GB Jupyter kernel would report at
    least 2 GB.) Elsewhere: ``ru_maxrss``.
    """
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: ``/proc/self/clear_refs``), so that a later
    ``peak_rss_bytes()`` sees only what comes after; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> bool:
    """Hand memory that was freed (e.g. fp32 weights replaced by 4-bit ones) back to the OS, so that
    RSS measures what is in use (glibc's ``malloc_trim``); False where that is not available."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0)) if name else False
    except (OSError, AttributeError):
        return False


def current_rss_bytes() -> int:
    """This process's resident memory now (psutil, else ``/proc/self/statm``)."""
    try:
        import psutil
    except ModuleNotFoundError:
        import os

        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.Process().memory_info().rss)


class PeakMemory:
    """Peak memory inside a ``with`` block: ``.peak`` (bytes) and ``.extra`` (above the start).

    CUDA: the allocator's ``max_memory_allocated`` (reset on entry). CPU: current RSS sampled
    every ``interval`` seconds by a thread (an RSS that was freed but not returned to the OS
    still counts, so compare cases in separate processes).
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.005):
        self.device, self.interval = torch.device(device), interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self.peak = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = current_rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")
