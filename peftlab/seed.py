"""The seed blog post's code, re-created so that the course can run it and show what goes wrong.

Every function and class here reproduces one snippet of the post (cited by section) with its
bugs left in on purpose: the wrong shapes, the missing freeze, the ``setattr`` with dotted
names, the wrong concatenation axis, the pickled checkpoint. Do not use them for anything
but the demonstrations in ``notebooks/10_seed_errata.ipynb``, which runs each one, shows the
error or measures the symptom, and then shows what peftlab does instead. Names and layout
are the course's own; behaviour is the post's.

What is *not* re-created: loading a pickle. The post loads its checkpoints with
``torch.load``; the notebook only inspects the pickle's opcodes (``pickletools``, which
executes nothing) to show what loading it would run.
"""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["SeedLoRAUpdate", "SeedLoRALinear", "seed_inject_lora", "SeedPrefix", "SeedPrefixTuning",
           "seed_attach_prefix", "SeedAdapter", "seed_adapter_without_residual", "seed_inject_adapters",
           "seed_scheduler_loop", "seed_save_lora", "pickle_imports", "seed_dynamic_load", "seed_objective",
           "SeedMixedPrecision"]


# -- §5.1: LoRA as a matrix update ----------------------------------------------------------
class SeedLoRAUpdate(nn.Module):
    """§5.1: A (d, r) called the down-projection, B (r, d) the up-projection, both N(0, 1);
    ``forward(W)`` returns the full (d, d) matrix W + A B and is never applied to an input."""

    def __init__(self, d: int, r: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(d, r))  # the post's "down-projection"
        self.B = nn.Parameter(torch.randn(r, d))  # the post's "up-projection"

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W + self.A @ self.B  # (d, d): a full matrix per call


# -- §7.2: LoRA wrapped around a layer, and the injection loop -------------------------------
class SeedLoRALinear(nn.Module):
    """§7.2: lora_A (out, r) and lora_B (r, in), both N(0, 1); output base(x) + x B^T A^T, no α/r.

    The base layer is not frozen, and the update is far from zero at initialisation.
    """

    def __init__(self, base_layer: nn.Linear, rank: int = 4) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Parameter(torch.randn(base_layer.weight.size(0), rank))  # (out, r)
        self.lora_B = nn.Parameter(torch.randn(rank, base_layer.weight.size(1)))  # (r, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + (x @ self.lora_B.T @ self.lora_A.T)


def seed_inject_lora(model: nn.Module, make=SeedLoRALinear) -> None:
    """§7.2 step 3: replace every ``nn.Linear`` while iterating ``named_modules()``, with
    ``setattr(model, dotted_name, ...)`` on the root (the classifier and pooler included)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            setattr(model, name, make(module))


# -- §5.2 and §7.3: "prefix-tuning" that is prompt tuning ------------------------------------
class SeedPrefix(nn.Module):
    """§5.2: a (m, d) prefix concatenated to the input on dim 0 (the batch axis of (B, T, d))."""

    def __init__(self, prefix_length: int, d: int) -> None:
        super().__init__()
        self.prefix = nn.Parameter(torch.randn(prefix_length, d))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.prefix, X], dim=0)


class SeedPrefixTuning(nn.Module):
    """§7.3: N(0, 1) vectors put in front of ``model.embeddings(input_ids)`` and fed back as
    ``inputs_embeds``; the attention mask keeps its old length."""

    def __init__(self, prefix_length: int, embedding_dim: int) -> None:
        super().__init__()
        self.prefix_embeddings = nn.Parameter(torch.randn(prefix_length, embedding_dim))

    def forward(self, input_ids, attention_mask, model):
        prefix = self.prefix_embeddings.unsqueeze(0).repeat(input_ids.size(0), 1, 1)
        inputs_embeds = model.embeddings(input_ids)
        inputs_embeds = torch.cat([prefix, inputs_embeds], dim=1)
        return model(inputs_embeds=inputs_embeds, attention_mask=attention_mask)


def seed_attach_prefix(model: nn.Module, prefix_tuning: SeedPrefixTuning) -> None:
    """§7.3 step 2: replace ``model.forward`` by a lambda of (input_ids, attention_mask) only;
    the module is never registered on the model."""
    model.forward = lambda input_ids, attention_mask: prefix_tuning(input_ids, attention_mask, model)


# -- §4.3, §5.3 and §7.4: adapters ------------------------------------------------------------
class SeedAdapter(nn.Module):
    """§5.3 / §7.4: h + up(relu(down(h))), both projections with nn.Linear's default init."""

    def __init__(self, d: int, r: int) -> None:
        super().__init__()
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.activation(self.down(x)))


def seed_adapter_without_residual(adapter: SeedAdapter, h: torch.Tensor) -> torch.Tensor:
    """§4.3's formula: W_up σ(W_down h), with no residual connection."""
    return adapter.up(adapter.activation(adapter.down(h)))


def seed_inject_adapters(model: nn.Module) -> None:
    """§7.4 step 2: after every nn.Linear, an adapter sized by ``weight.size(1)`` (in_features)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            setattr(model, name, nn.Sequential(module, SeedAdapter(d=module.weight.size(1), r=4)))


# -- §6.3: the scheduler snippet --------------------------------------------------------------
def seed_scheduler_loop(model: nn.Module) -> None:
    """§6.3: an optimizer over every parameter and a loop of optimizer/scheduler steps with no
    forward, backward or zero_grad; ``num_training_steps`` is used but never defined."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=100, num_training_steps=1000)
    for step in range(num_training_steps):  # noqa: F821  (undefined, as in the post)
        optimizer.step()
        scheduler.step()


# -- §6.4 and §8.5: saving and loading -------------------------------------------------------
def seed_save_lora(lora: SeedLoRAUpdate, path: str | Path) -> None:
    """§6.4: ``torch.save`` (a pickle) of one LoRA module's two parameters."""
    torch.save({"lora_A": lora.A, "lora_B": lora.B}, str(path))


def pickle_imports(path: str | Path) -> list[str]:
    """The ``module name`` pairs that unpickling ``path`` (a torch.save zip) would import and call.

    Reads the pickle's opcodes with ``pickletools.genops``, which executes nothing.
    """
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        data = zf.read(name)
    found, strings = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            found.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
    return list(dict.fromkeys(found))


def seed_dynamic_load(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """§8.5: ``setattr(model, name, param)`` for every key of a state dict."""
    for name, param in state_dict.items():
        setattr(model, name, param)


# -- §6.2: the Optuna objective -------------------------------------------------------------
def seed_objective(trial) -> float:
    """§6.2: one search over a LoRA rank *and* a prefix length, via an undefined trainer."""
    rank = trial.suggest_int("rank", 2, 16)
    prefix_length = trial.suggest_int("prefix_length", 4, 16)
    accuracy = train_peft_model(rank=rank, prefix_length=prefix_length)  # noqa: F821  (undefined, as in the post)
    return accuracy


# -- §8.3: mixed precision --------------------------------------------------------------------
class SeedMixedPrecision:
    """§8.3: ``torch.cuda.amp.GradScaler()`` and ``torch.cuda.amp.autocast()`` (CUDA-only, deprecated)."""

    @staticmethod
    def make():
        scaler = torch.cuda.amp.GradScaler()
        context = torch.cuda.amp.autocast()
        return scaler, context
