"""Adapter arithmetic: a new LoRA adapter made from weighted combinations of existing ones.

``add_weighted_adapter(model, ["rt", "imdb"], [0.5, 0.5], "both", combination_type="cat")`` adds
adapter ``"both"`` through ``peftlab.inject`` (so ``set_active``, ``merge``, ``save_adapter``
and ``delete`` treat it like any other LoRA adapter) and fills its factors from the sources.
Write s_i for source i's scaling, A_i (r_i, in), B_i (out, r_i), Delta_i = s_i B_i A_i (out, in).
The new adapter has alpha = r (scaling 1: the scalings live in the factors).  The rules are
those of HF peft's ``LoraModel.add_weighted_adapter`` (and its results agree with peft's):

* ``cat``: A = [w_1 s_1 A_1; ...; w_n s_n A_n] (stacked rows), B = [B_1, ..., B_n] (side by
  side), rank sum_i r_i.  B A = sum_i w_i Delta_i exactly: plain task arithmetic on the deltas.
* ``svd``: the best rank-k approximation (truncated SVD) of sum_i w_i Delta_i, k = ``svd_rank``
  (default: the largest source rank); B = U_k S_k, A = V_k^T.  ``ties_svd``, ``dare_linear_svd``,
  ``dare_ties_svd`` and ``magnitude_prune_svd`` combine the deltas with that rule of
  ``peftlab.merging`` instead of the weighted sum, then compress the same way.
* ``linear``: the factors themselves are combined, A = sum_i c_i A_i and B = sum_i |c_i| B_i with
  c_i = sign(w_i s_i) sqrt(|w_i s_i|).  Then B A = sum_i w_i Delta_i + sum_{i != j} |c_i| c_j B_i A_j:
  the cross terms make this only a rough stand-in for the weighted sum (notebook 12 measures them).
  ``ties``, ``dare_linear``, ``dare_ties`` and ``magnitude_prune`` apply their rule to the A's and
  to the B's in the same way.  All five need sources of one rank (the factors are added entrywise).

A layer that only some sources adapt combines the sources it has (a missing source counts as
zero, which for every rule above gives the same result as leaving it out; DARE draws its masks
for the sources present only).  With one source every rule is ``linear`` (as in peft).

Classification heads (``modules_to_save`` copies, e.g. MiniLM's ``classifier``): the new adapter
needs its own copy, because a low-rank update of the body is useless under an untrained head.
``head="mean"`` gives it the weighted mean sum_i w_i theta_i / sum_i w_i of the sources' copies:
sensible when the heads score the same label set in the same order (two binary sentiment heads)
and were trained on top of similar bodies, meaningless otherwise.  ``head="<source name>"``
takes that source's copy unchanged.  Models whose sources have no copies keep ``head=None``.
(HF peft refuses sources with copies of the same module, and with one source's copies gives the
new adapter a fresh, untrained copy.)

Deliberate differences from peft: an existing ``adapter_name`` raises instead of returning
silently; unused options (``density`` for ``cat``, ``svd_rank`` for ``linear``) raise instead of
being ignored; ``svd_rank`` above a layer's min(in, out) raises (peft builds factors of the wrong
shape); the new adapter uses alpha = r without rsLoRA (peft copies ``use_rslora`` from the first
source, which then scales the merged update by sqrt(r) a second time); it becomes the active
adapter, as after ``inject``.  Every check runs before the model is touched: a refused call
leaves it exactly as it was.  Explained in notebooks/12_adapter_arithmetic.ipynb.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import LoRAConfig
from .inject import check_adapter_name, delete, inject, set_active
from .lora import LoRALinear
from .merging import MERGES, SIGN_METHODS
from .registry import active_adapter, configs
from .targets import find_modules, walk
from .wrappers import ModulesToSaveWrapper

__all__ = ["add_weighted_adapter", "COMBINATION_TYPES"]

FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # combine A's and B's
DELTA_WISE = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")  # combine B A's
COMBINATION_TYPES = ("svd", "linear", "cat") + tuple(t for t in FACTOR_WISE + DELTA_WISE
                                                     if t not in ("svd", "linear"))


def _check_new_name(model: nn.Module, name: object) -> None:
    """Refuse a name the new adapter cannot take (``ValueError``), as ``inject`` would, but before any
    work: a non-empty string without dots that is not an ``nn.ModuleDict`` attribute
    (``peftlab.inject.check_adapter_name``: ``"forward"``, ``"double"``...), and not taken yet."""
    check_adapter_name(name)
    if name in configs(model):
        raise ValueError(f"an adapter named {name!r} already exists: pick another adapter_name or call "
                         f"peftlab.delete(model, {name!r}) first")


@dataclass
class _Plan:
    kind: str  # the combination rule actually used ("linear" for a single source)
    rank: int  # the new adapter's rank
    layers: list[tuple[str, LoRALinear, list[int]]]  # (path, layer, indices of the sources it holds)
    config: LoRAConfig  # what inject() gets
    head: str | None  # None, "mean" or a source name


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_sources(model: nn.Module, adapters: object, weights: object) -> list[LoRAConfig]:
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}: e.g. ['rt', 'imdb']")
    known = list(configs(model))
    for a in adapters:
        if a not in known:
            raise ValueError(f"no adapter named {a!r} to combine: the model's adapters are {known}")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters lists a name twice ({list(adapters)}): list each once and add up its weights")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
        n = len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__
        raise ValueError(f"weights must be a list with one number per adapter ({len(adapters)}), got {n}: "
                         f"e.g. weights={[1.0] * len(adapters)}")
    bad = [w for w in weights if not _is_number(w)]
    if bad:
        raise ValueError(f"weights must be finite numbers, got {bad[0]!r} in {list(weights)}")
    out = []
    for a in adapters:
        c = configs(model)[a]
        if not isinstance(c, LoRAConfig):
            raise ValueError(f"adapter {a!r} ({type(c).__name__}) is not a LoRA adapter: only LoRA adapters can be "
                             "combined")
        if c.use_dora:
            raise ValueError(f"adapter {a!r} is a DoRA adapter: its magnitude vector rescales whole rows and does "
                             f"not add up like B A; combine plain LoRA adapters only")
        out.append(c)
    return out


def _check_options(kind: str, density: object, svd_rank: object, svd_clamp: object, sign: object) -> None:
    _, uses_density, _ = MERGES.get(kind.removesuffix("_svd") if kind != "svd" else "linear", (None, False, False))
    if uses_density:
        if density is None:
            raise ValueError(f"combination_type={kind!r} needs density, the share of entries kept, in (0, 1]: "
                             f"e.g. density=0.5")
        if not _is_number(density) or not 0 < density <= 1:
            raise ValueError(f"density must be a number in (0, 1] (the share of entries kept), got {density!r}")
    elif density is not None:
        raise ValueError(f"combination_type={kind!r} does not prune, so density={density!r} would be ignored: "
                         "remove it, or use e.g. 'ties' / 'dare_linear'")
    if sign not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {sign!r}")
    svd = kind in DELTA_WISE
    if svd_rank is not None:
        if not svd:
            raise ValueError(f"svd_rank={svd_rank!r} is used only by the SVD combinations {DELTA_WISE}, not by "
                             f"{kind!r}: remove it or pick one of those")
        if isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0:
            raise ValueError(f"svd_rank must be a positive int, got {svd_rank!r}: e.g. svd_rank=8, or None for the "
                             "largest source rank")
    if svd_clamp is not None and (not svd or not _is_number(svd_clamp) or not 0 < svd_clamp <= 1):
        raise ValueError(f"svd_clamp={svd_clamp!r} must be None or a quantile in (0, 1] (e.g. 0.99), and only "
                         f"with an SVD combination {DELTA_WISE}")


def _head_paths(model: nn.Module, name: str) -> list[str]:
    return [p for p, m in walk(model) if isinstance(m, ModulesToSaveWrapper) and name in m.modules_to_save]


def _check_head(model: nn.Module, adapters: list[str], weights: list[float], head: object) -> None:
    have = {a: _head_paths(model, a) for a in adapters}
    with_copies = [a for a in adapters if have[a]]
    if head is None:
        if with_copies:
            raise ValueError(f"adapters {with_copies} have trained copies of {have[with_copies[0]]} "
                             f"(modules_to_save): the new adapter needs one too. Pass head='mean' (weighted mean "
                             f"of the copies; for heads of the same label set) or head={with_copies[0]!r} "
                             f"(that adapter's copy)")
        return
    if not with_copies:
        raise ValueError(f"head={head!r}, but none of {adapters} has modules_to_save copies: leave head=None")
    if head == "mean":
        differ = [a for a in adapters if have[a] != have[adapters[0]]]
        if differ:
            raise ValueError(f"head='mean' needs copies of the same modules in every adapter: {adapters[0]!r} has "
                             f"{have[adapters[0]]}, {differ[0]!r} has {have[differ[0]]}; pass head=<adapter name>")
        if any(w <= 0 for w in weights):
            raise ValueError(f"head='mean' averages the heads with the weights, which must be positive, got "
                             f"{weights}: pass head=<adapter name> to keep one adapter's head")
        return
    if head not in adapters or not have[head]:
        raise ValueError(f"head must be None, 'mean' or one of the combined adapters with modules_to_save copies "
                         f"({with_copies}), got {head!r}")


def _targets(model: nn.Module, sources: list[LoRAConfig], paths: list[str], saves: tuple) -> tuple[str, ...] | str:
    """The new config's target_modules: the union of the sources' name lists if that selects exactly
    ``paths``, else the paths themselves (one full-name entry per layer)."""
    if all(isinstance(c.target_modules, tuple) for c in sources):
        union = tuple(dict.fromkeys(t for c in sources for t in c.target_modules))
        found = find_modules(model, LoRAConfig(target_modules=union, modules_to_save=saves))
        if sorted(n for n, _, _ in found.targets) == sorted(paths) and not found.unsupported:
            return union
    return tuple(paths)


def _plan(model, adapters, weights, adapter_name, combination_type, svd_rank, density, sign, head,
          svd_clamp) -> _Plan:
    _check_new_name(model, adapter_name)
    sources = _check_sources(model, adapters, weights)
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"unknown combination_type {combination_type!r}: choose one of {COMBINATION_TYPES}")
    _check_options(combination_type, density, svd_rank, svd_clamp, sign)  # what the caller asked for
    kind = "linear" if len(adapters) == 1 else combination_type  # one source: every rule is a rescaling (peft)
    _check_head(model, list(adapters), list(weights), head)
    all_layers = [(p, m) for p, m in walk(model) if isinstance(m, LoRALinear)]
    if any(m.merged for _, m in all_layers):
        raise RuntimeError("LoRA weights are merged into the model: call peftlab.unmerge(model) before combining "
                           "adapters")
    ranks = [c.r for c in sources]
    if kind in FACTOR_WISE and len(set(ranks)) > 1:
        raise ValueError(f"combination_type={kind!r} adds the A and B factors entrywise, so the adapters need one "
                         f"rank, got {dict(zip(adapters, ranks))}: use 'cat' or 'svd' (any ranks)")
    rank = sum(ranks) if kind == "cat" else (svd_rank or max(ranks)) if kind in DELTA_WISE else ranks[0]
    layers = [(p, m, [i for i, a in enumerate(adapters) if a in m.lora_A]) for p, m in all_layers]
    layers = [(p, m, present) for p, m, present in layers if present]
    if kind in DELTA_WISE:
        path, m, _ = min(layers, key=lambda x: min(x[1].in_features, x[1].out_features))
        most = min(m.in_features, m.out_features)
        if rank > most:
            raise ValueError(f"svd_rank={rank} exceeds min(in, out) = {most} of layer {path!r}, the most an SVD can "
                             f"keep there: use svd_rank <= {most}")
    saves = () if head is None else sources[0 if head == "mean" else list(adapters).index(head)].modules_to_save
    first = sources[0]
    config = LoRAConfig(r=rank, alpha=rank, dropout=first.dropout, bias=first.bias, modules_to_save=saves,
                        target_modules=_targets(model, sources, [p for p, _, _ in layers], saves))
    return _Plan(kind, rank, layers, config, head)


# -- the combinations, one layer at a time ----------------------------------------------------
def _cat(layer: LoRALinear, names: list[str], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([layer.lora_A[n].weight * w * layer.scaling[n] for n, w in zip(names, weights)], dim=0)
    b = torch.cat([layer.lora_B[n].weight for n in names], dim=1)
    return a, b  # (sum r_i, in), (out, sum r_i)


def _factor_wise(kind: str, layer: LoRALinear, names: list[str], weights: list[float], density, sign):
    scaled = [w * layer.scaling[n] for n, w in zip(names, weights)]
    root = [math.sqrt(abs(c)) for c in scaled]
    on_a = [r if c >= 0 else -r for r, c in zip(root, scaled)]  # the sign goes on A only: B A keeps it once
    rule = MERGES[kind][0]
    a = rule([layer.lora_A[n].weight for n in names], on_a, density, sign)  # (r, in)
    b = rule([layer.lora_B[n].weight for n in names], root, density, sign)  # (out, r)
    return a, b


def _delta_wise(kind: str, layer: LoRALinear, names: list[str], weights: list[float], rank: int, density, sign,
                clamp, full_matrices: bool, driver):
    dt = torch.promote_types(layer.lora_A[names[0]].weight.dtype, torch.float32)
    deltas = [(layer.lora_B[n].weight.to(dt) @ layer.lora_A[n].weight.to(dt)) * layer.scaling[n]
              for n in names]  # each (out, in)
    rule = MERGES["linear" if kind == "svd" else kind.removesuffix("_svd")][0]
    delta = rule(deltas, weights, density, sign)  # (out, in)
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)  # (out, out), (k,), (in, in)
    b = u[:, :rank] @ torch.diag(s[:rank])  # (out, rank): singular values on B's side
    a = vh[:rank, :]  # (rank, in), orthonormal rows
    if clamp is not None:  # clip outliers at the clamp-quantile of all entries of both factors
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        a, b = a.clamp(-hi, hi), b.clamp(-hi, hi)
    return a, b


def _mean_heads(model: nn.Module, adapters: list[str], weights: list[float], name: str) -> None:
    total = sum(weights)
    for _, wrapper in walk(model):
        if not isinstance(wrapper, ModulesToSaveWrapper) or name not in wrapper.modules_to_save:
            continue
        states = [wrapper.modules_to_save[a].state_dict() for a in adapters]
        target = wrapper.modules_to_save[name].state_dict()
        for key, tensor in target.items():
            if tensor.is_floating_point():
                tensor.copy_(sum(w * s[key] for w, s in zip(weights, states)) / total)
            else:  # integer buffers (e.g. position ids) cannot be averaged: they are the same anyway
                tensor.copy_(states[0][key])


def _copy_head(model: nn.Module, source: str, name: str) -> None:
    for _, wrapper in walk(model):
        if isinstance(wrapper, ModulesToSaveWrapper) and name in wrapper.modules_to_save:
            wrapper.modules_to_save[name].load_state_dict(wrapper.modules_to_save[source].state_dict())


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", *, svd_rank: int | None = None,
                         density: float | None = None, majority_sign_method: str = "total",
                         head: str | None = None, svd_clamp: float | None = None, svd_full_matrices: bool = True,
                         svd_driver: str | None = None) -> nn.Module:
    """Add LoRA adapter ``adapter_name`` combining ``adapters`` with ``weights``; return ``model``.

    ``combination_type``: one of ``COMBINATION_TYPES`` (rules in the module docstring).
    ``svd_rank``: the rank kept by the SVD combinations (default: the largest source rank).
    ``density``: share of entries kept, in (0, 1], for ``ties``, ``dare_*`` and ``magnitude_prune*``.
    ``majority_sign_method``: ``"total"`` or ``"frequency"`` (TIES's sign election, ``peftlab.merging``).
    ``head``: None, ``"mean"`` or a source's name: where the new adapter's ``modules_to_save``
    copies come from (module docstring).  ``svd_clamp``, ``svd_full_matrices``, ``svd_driver``:
    as in peft (clip both factors at that quantile of their entries; ``torch.linalg.svd`` options).

    The new adapter becomes the active one (as after ``inject``).  The random DARE rules draw
    from the global torch generator after the new adapter's own initialisation, layer by layer,
    A's before B's, as peft does: the same seed gives peft's masks.  Raises ``ValueError`` (or
    ``RuntimeError`` while weights are merged) before any change when the call cannot be done.
    """
    plan = _plan(model, adapters, weights, adapter_name, combination_type, svd_rank, density, majority_sign_method,
                 head, svd_clamp)
    before = active_adapter(model)
    inject(model, plan.config, adapter_name)
    try:
        with torch.no_grad():
            for _, layer, present in plan.layers:
                names, ws = [adapters[i] for i in present], [float(weights[i]) for i in present]
                if plan.kind == "cat":
                    a, b = _cat(layer, names, ws)
                elif plan.kind in FACTOR_WISE:
                    a, b = _factor_wise(plan.kind, layer, names, ws, density, majority_sign_method)
                else:
                    a, b = _delta_wise(plan.kind, layer, names, ws, plan.rank, density, majority_sign_method,
                                       svd_clamp, svd_full_matrices, svd_driver)
                new_a, new_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
                new_a.zero_()
                new_b.zero_()
                new_a[: a.shape[0]] = a.to(new_a.dtype)  # cat: rows of sources absent here stay 0
                new_b[:, : b.shape[1]] = b.to(new_b.dtype)
            if head == "mean":
                _mean_heads(model, list(adapters), [float(w) for w in weights], adapter_name)
            elif head is not None:
                _copy_head(model, head, adapter_name)
    except BaseException:  # not expected after the checks (e.g. out of memory): leave no half-made adapter
        delete(model, adapter_name)
        set_active(model, before)
        raise
    return model
