"""One function that turns a base classifier into any of the course's fine-tuning setups.

Used by notebooks 01 and 07, ``peftlab train`` (``peftlab.cli``), ``peftlab.search`` and the
benchmark table (``peftlab.bench.table``), so the notebooks, the command line, the search and
the table train exactly the same thing, each method at its own default learning rate
(``LEARNING_RATES``). Methods:

* ``head``: the pretrained body frozen, only the classification head trained (a baseline);
* ``full``: every parameter trained (the reference the others are compared to);
* ``lora``: peftlab's LoRA (``peftlab.inject``) on query/value plus the head;
* ``peft-lora``: the same through HF peft's ``get_peft_model`` (for comparison);
* ``prefix``: peftlab prefix-tuning with flat prefixes (no MLP) plus the head, the head at its own
  rate (``TRAIN_OPTIONS``);
* ``prompt``: peftlab prompt tuning plus the head;
* ``houlsby`` / ``pfeiffer``: bottleneck adapters, when ``peftlab.adapters`` is installed;
* ``dora``: LoRA with DoRA's magnitude/direction split (``LoRAConfig(use_dora=True)``);
* ``lora-plus``: plain LoRA trained with LoRA+'s learning-rate ratio for B over A
  (``TRAIN_OPTIONS``: ``TrainConfig(loraplus_ratio=...)``);
* ``qlora``: the body's linear layers stored in 4-bit NF4 (``peftlab.quant``), LoRA on top;
* ``ia3``: IA³ rescaling of keys, values and the feed-forward activation (``peftlab.ia3``).

A method whose module is not there yet raises ``MethodUnavailable`` (the bench then writes
"not available yet" in its row instead of inventing numbers). Explained in
``notebooks/07_training.ipynb``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

__all__ = ["LEARNING_RATES", "METHODS", "TRAIN_OPTIONS", "MethodHParams", "MethodUnavailable", "available", "head_names",
           "prepare", "save_trained"]

METHODS = ("head", "full", "peft-lora", "lora", "prefix", "prompt", "houlsby", "pfeiffer", "dora", "lora-plus",
           "qlora", "ia3")
# one learning rate per method at batch 32 for one epoch: LoRA and adapters ~2e-3, full fine-tuning
# ~5e-5 (its updates touch every weight), the bare head and prompt tuning higher, flat prefixes
# higher still (MiniLM / Rotten Tomatoes, seed 2, one epoch, head at 1e-2: 0.744 at 1e-2, 0.763 at
# 2e-2, 0.788 at 5e-2; through the paper's MLP 0.761 at 1e-3 and one class from 2e-3 up: the MLP
# multiplies the step: within 20 steps every sentence gets nearly the same [CLS] state, and the
# prefix takes most of [CLS]'s attention). The reference tables train with them; tune them with peftlab.search.
LEARNING_RATES = {"head": 1e-2, "full": 5e-5, "peft-lora": 2e-3, "lora": 2e-3, "prefix": 5e-2,
                  "prompt": 3e-2, "houlsby": 2e-3, "pfeiffer": 2e-3, "dora": 2e-3, "lora-plus": 2e-3,
                  "qlora": 2e-3, "ia3": 3e-2}
# what a method changes in the TrainConfig besides its learning rate: LoRA+ trains B at
# lr * loraplus_ratio (Hayou et al. 2024 suggest ~16; on MiniLM / Rotten Tomatoes at 100 steps, seed 0,
# ratio 16 diverged at lr 2e-3 and trailed LoRA at 1e-3 and 5e-4, ratio 4 at 2e-3 did best of those)
# Prefix-tuning trains its head at the bare head's rate (1e-2), not at the prefix's: everything at 1e-3
# left the head behind (seed 2 at chance; through the MLP with the head at 1e-2: 0.761). Training
# MiniLM's pooler too did not help reliably (seed 0: 0.764 with it, 0.776 without; seed 2: 0.801 vs
# 0.788). Each of these runs: `python -m peftlab.bench.prefix_probe` (one JSON line per run).
TRAIN_OPTIONS = {"lora-plus": {"loraplus_ratio": 4.0}, "prefix": {"head_lr": 1e-2}}


class MethodUnavailable(RuntimeError):
    """The method's implementation is not part of this peftlab installation (yet)."""


@dataclass
class MethodHParams:
    """Hyper-parameters of every method; each method reads the ones it needs."""

    r: int = 8  # LoRA rank
    alpha: float = 16  # LoRA scaling numerator (alpha / r)
    dropout: float = 0.0  # LoRA dropout
    target_modules: tuple[str, ...] = ("query", "value")  # LoRA targets (BERT names)
    prefix_length: int = 16  # prefix / prompt tuning: number of virtual tokens
    bottleneck: int = 32  # adapters: bottleneck width


def head_names(model: nn.Module) -> tuple[str, ...]:
    """The classification head's module name(s) for the models the course uses."""
    for name in ("classifier", "score"):
        if hasattr(model, name):
            return (name,)
    raise ValueError(f"{type(model).__name__} has no 'classifier' or 'score' head: the methods "
                     "here fine-tune sequence classifiers (load_model(..., task='classification'))")


def _freeze(model: nn.Module, keep: tuple[str, ...] = ()) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = any(name == k or name.startswith(k + ".") for k in keep)


def _adapter_config(method: str, hp: MethodHParams, head: tuple[str, ...]):
    try:
        importlib.import_module("peftlab.adapters")  # registers the method with inject/save
        from peftlab.config import AdapterConfig
    except ImportError as err:
        raise MethodUnavailable(f"method {method!r} needs peftlab.adapters, which is not available "
                                f"yet in this installation ({err})") from None
    return AdapterConfig(bottleneck=hp.bottleneck, placement=method, modules_to_save=head)


def prepare(model: nn.Module, method: str, hp: MethodHParams | None = None) -> nn.Module:
    """Set ``model`` up for ``method`` (in place where possible) and return the model to train.

    ``peft-lora`` returns HF peft's wrapper around ``model``; every other method returns
    ``model`` itself.
    """
    hp = hp or MethodHParams()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    head = head_names(model)
    if method == "head":
        _freeze(model, head)
        return model
    if method == "full":
        for p in model.parameters():
            p.requires_grad = True
        return model
    if method in ("lora", "dora", "lora-plus", "qlora"):
        from peftlab.config import LoRAConfig
        from peftlab.inject import inject

        if method == "qlora":  # the frozen body in 4-bit NF4 (the head stays fp32: it is trained)
            from peftlab.quant import quantize_model

            quantize_model(model, skip=head)
        return inject(model, LoRAConfig(r=hp.r, alpha=hp.alpha, dropout=hp.dropout, use_dora=method == "dora",
                                        target_modules=tuple(hp.target_modules), modules_to_save=head))
    if method == "ia3":
        from peftlab.ia3 import IA3Config
        from peftlab.inject import inject

        return inject(model, IA3Config(modules_to_save=head))
    if method == "peft-lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=hp.r, lora_alpha=hp.alpha, lora_dropout=hp.dropout,
                         target_modules=list(hp.target_modules), modules_to_save=list(head),
                         task_type="SEQ_CLS")
        return get_peft_model(model, cfg)
    if method in ("prefix", "prompt"):
        try:
            from peftlab.config import PrefixConfig, PromptTuningConfig

            importlib.import_module(f"peftlab.{method}")  # registers the method with inject
        except (ImportError, ModuleNotFoundError) as err:
            raise MethodUnavailable(f"method {method!r} is not available yet ({err})") from None
        from peftlab.inject import inject

        if method == "prefix":  # flat: the MLP is a generation-time stabiliser that collapses here (see above)
            return inject(model, PrefixConfig(num_virtual_tokens=hp.prefix_length, projection=False,
                                              modules_to_save=head))
        return inject(model, PromptTuningConfig(num_virtual_tokens=hp.prefix_length, modules_to_save=head))
    from peftlab.inject import inject

    return inject(model, _adapter_config(method, hp, head))


def available(method: str) -> str | None:
    """None when ``method`` can run here, else the reason it cannot."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    probe = T.BertForSequenceClassification(T.BertConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=10,
        max_position_embeddings=32))
    try:
        prepare(probe, method, MethodHParams(r=2, prefix_length=2, bottleneck=4))
    except MethodUnavailable as err:
        return str(err)
    return None


def save_trained(model: nn.Module, method: str, directory) -> int:
    """Write what a user must keep after training ``method``; return its size in bytes.

    Adapters: the adapter folder (``peftlab.save_adapter`` / peft's ``save_pretrained``);
    ``head``: the head's weights; ``full``: the whole model's safetensors.
    """
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if method == "peft-lora":
        model.save_pretrained(str(out))
    elif method == "full":
        model.save_pretrained(str(out), safe_serialization=True)
    elif method == "head":
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(out / "head.safetensors"))
    else:
        if method in ("prefix", "prompt"):
            importlib.import_module("peftlab.prefix_io")  # registers their save format
        from peftlab.io import save_adapter

        save_adapter(model, out)
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
