"""The catastrophic-forgetting experiment: learn task A, then task B, and score A again.

Fine-tuning every weight of a network on a new task degrades what it learned before
(McCloskey & Cohen 1989, "Catastrophic Interference in Connectionist Networks"; French 1999,
"Catastrophic forgetting in connectionist networks"). Adapters avoid it by construction: the
base is frozen and task B trains only its own adapter, so switching back to A's adapter gives
A's model back bit for bit (Houlsby et al. 2019, arXiv:1902.00751, section 1).

Two runs of one protocol, each returning a :class:`Forgetting`:

* :func:`full_fine_tuning`: every weight trainable; A with the model's head, B with a fresh
  head of the same shape, then A's head put back on the encoder trained for B;
* :func:`with_adapters`: one adapter per task (any registered methods, e.g. LoRA for A and a
  Houlsby adapter for B, each with ``modules_to_save=("classifier",)`` for a head of its own),
  then A's adapter made active again.

Both change the model in place: the trained model is part of the result. Accuracies come from
:func:`peftlab.metrics.evaluate_classifier`. Used in notebooks/01_motivation.ipynb (section 5)
and notebooks/09_deployment.ipynb (catastrophic forgetting).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from peftlab.inject import configs, inject, set_active
from peftlab.metrics import evaluate_classifier
from peftlab.train import TrainConfig, train

__all__ = ["Forgetting", "find_head", "full_fine_tuning", "with_adapters"]

HEAD_NAMES = ("classifier", "score")  # the classification head of HF *ForSequenceClassification models


@dataclass(frozen=True)
class Forgetting:
    """Accuracies (0-1) of one run; the probe logits are there when a probe batch was passed."""

    a_before: float  # task-A accuracy right after training A
    b: float  # task-B accuracy right after training B
    a_after: float  # task-A accuracy after training B (A's head put back / A's adapter active)
    probe_before: torch.Tensor | None = field(default=None, compare=False, repr=False)  # (batch, labels)
    probe_after: torch.Tensor | None = field(default=None, compare=False, repr=False)  # (batch, labels)

    @property
    def forgetting(self) -> float:
        """Accuracy on A lost by training B: ``a_before - a_after`` (0 for adapters)."""
        return self.a_before - self.a_after


def find_head(model: nn.Module, head: str | None = None) -> str:
    """Name of the model's classification head: ``head`` if given, else the first of ``HEAD_NAMES``."""
    names = (head,) if head is not None else HEAD_NAMES
    for name in names:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(
        f"{type(model).__name__} has no classification head named {' or '.join(map(repr, names))}: "
        "the forgetting experiment needs a sequence classifier, e.g. "
        "peftlab.load_model(..., task='classification'), or pass head='<name of the head module>'"
    )


def _accuracy(model: nn.Module, data) -> float:
    return evaluate_classifier(model, data)["accuracy"]


def _probe_logits(model: nn.Module, probe: Mapping[str, torch.Tensor] | None) -> torch.Tensor | None:
    """Logits (batch, labels) of ``model`` on the tokenised batch ``probe``, in eval mode."""
    if probe is None:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(**probe).logits
    finally:
        model.train(was_training)


def _fresh_copy(head: nn.Module, seed: int) -> nn.Module:
    """A copy of ``head`` with re-initialised weights; the same numbers on any device for one seed."""
    device = next(head.parameters()).device
    fresh = copy.deepcopy(head).cpu()
    resettable = [m for m in fresh.modules() if hasattr(m, "reset_parameters")]
    if not resettable:
        raise TypeError(f"cannot re-initialise the head {type(head).__name__}: none of its modules "
                        "has reset_parameters()")
    with torch.random.fork_rng(devices=[]):  # the global random state is left as it was
        torch.manual_seed(seed)
        for m in resettable:
            m.reset_parameters()
    return fresh.to(device)


def full_fine_tuning(model: nn.Module, task_a, task_b, eval_a, eval_b, config_a: TrainConfig,
                     config_b: TrainConfig | None = None, *, seed: int = 0, head: str | None = None,
                     probe: Mapping[str, torch.Tensor] | None = None) -> Forgetting:
    """Train all of ``model`` on A, then on B with a fresh head, then score A with A's head.

    ``task_*``/``eval_*``: tokenised datasets (``peftlab.data.tokenize_classification``) with
    as many labels as the head has outputs; B's head is a copy of A's re-initialised from
    ``seed``. ``config_b`` defaults to ``config_a``. ``head``: the head's attribute name
    (default: ``classifier`` or ``score``, see :func:`find_head`). ``probe``: an optional
    tokenised batch whose logits with A's head are returned, after A and after B.

    Changes ``model`` in place: every weight is made trainable, the encoder ends trained on A
    then B, and A's head module (the same object, untouched while B trained) is back on it.
    """
    name = find_head(model, head)  # fail before any training
    if configs(model):
        raise ValueError(f"the model carries adapters {list(configs(model))}: full fine-tuning needs a plain model")
    model.requires_grad_(True)
    train(model, task_a, None, config_a)
    a_before = _accuracy(model, eval_a)
    probe_before = _probe_logits(model, probe)

    head_a = getattr(model, name)
    setattr(model, name, _fresh_copy(head_a, seed))  # task B's own head; A's is out of the optimizer's reach
    train(model, task_b, None, config_b or config_a)
    b = _accuracy(model, eval_b)

    setattr(model, name, head_a)  # A's head again, on the encoder trained for B
    a_after = _accuracy(model, eval_a)
    return Forgetting(a_before, b, a_after, probe_before, _probe_logits(model, probe))


def with_adapters(model: nn.Module, config_a, config_b, task_a, task_b, eval_a, eval_b, train_a: TrainConfig,
                  train_b: TrainConfig | None = None, *, names: tuple[str, str] = ("task_a", "task_b"),
                  probe: Mapping[str, torch.Tensor] | None = None) -> Forgetting:
    """Inject and train adapter ``config_a`` for A, then ``config_b`` for B, then score A again.

    ``config_a``/``config_b``: configs of any methods (e.g. ``LoRAConfig`` and a Houlsby
    ``AdapterConfig``); give each ``modules_to_save=("classifier",)`` for a head per task.
    ``train_b`` defaults to ``train_a``. ``probe``: an optional tokenised batch whose logits
    with adapter A are returned, after A and after B (equal, bit for bit).

    Changes ``model`` in place: it ends with both adapters, named ``names``, and A's active.
    """
    name_a, name_b = names
    if name_a == name_b:
        raise ValueError(f"the two adapters need different names, got names={names!r}")
    taken = [n for n in names if n in configs(model)]
    if taken:  # checked now, not after training A
        raise ValueError(f"adapters {taken} are already on the model: pick other names")
    inject(model, config_a, name=name_a)
    train(model, task_a, None, train_a)
    a_before = _accuracy(model, eval_a)
    probe_before = _probe_logits(model, probe)

    inject(model, config_b, name=name_b)  # now the only trainable part
    train(model, task_b, None, train_b or train_a)
    b = _accuracy(model, eval_b)

    set_active(model, name_a)
    a_after = _accuracy(model, eval_a)
    return Forgetting(a_before, b, a_after, probe_before, _probe_logits(model, probe))
