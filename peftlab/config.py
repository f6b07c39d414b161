"""Configuration dataclasses for the parameter-efficient methods in peftlab.

Every method gets one ``@dataclass`` that validates itself in ``__post_init__`` so
that a typo fails at construction time, with a message that names the bad value
and says how to fix it, rather than deep inside a forward pass.

LoRA follows Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models" (arXiv:2106.09685); rsLoRA scaling follows Kalajdzievski 2023, "A Rank
Stabilization Scaling Factor for Fine-Tuning with LoRA" (arXiv:2312.03732); DoRA follows
Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv:2402.09353).
The fields are explained in notebooks/03_lora.ipynb.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["AdapterConfigBase", "LoRAConfig", "PrefixConfig", "PromptTuningConfig", "config_from_dict",
           "AdapterConfig"]

# method name -> config class; filled automatically by AdapterConfigBase.__init_subclass__
_CONFIG_CLASSES: dict[str, type["AdapterConfigBase"]] = {}


@dataclass
class AdapterConfigBase:
    """Common base of all peftlab method configs.

    Subclasses set the class attribute ``method`` (e.g. ``"lora"``), declare their
    fields as dataclass fields and validate them in ``__post_init__``.  The base
    class provides JSON round-tripping via :meth:`to_dict` / :meth:`from_dict`.
    """

    method: ClassVar[str] = "base"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method != "base":
            _CONFIG_CLASSES[cls.method] = cls

    # -- helpers for subclasses -------------------------------------------------
    def _fail(self, field: str, value: Any, requirement: str, fix: str) -> None:
        """Raise a uniform ``ValueError``: which field, what it got, how to fix it."""
        raise ValueError(f"{type(self).__name__}.{field} must be {requirement}, got {value!r}: {fix}")

    # -- serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict: tuples become lists, ``method`` is included."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfigBase":
        """Inverse of :meth:`to_dict`.

        Called on the base class it dispatches on ``data["method"]``; called on a
        subclass it checks the method matches.  Unknown keys raise ``ValueError``.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        data = dict(data)
        method = data.pop("method", cls.method)
        target = _CONFIG_CLASSES.get(method) if cls is AdapterConfigBase else cls
        if target is None:
            known = ", ".join(sorted(_CONFIG_CLASSES))
            raise ValueError(f"unknown adapter method {method!r}: expected one of {known}")
        if method != target.method:
            raise ValueError(f"{target.__name__}.from_dict got method {method!r}, expected {target.method!r}")
        names = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"{target.__name__}.from_dict got unknown field(s) {unknown}: valid fields are {sorted(names)}"
            )
        return target(**data)


def config_from_dict(data: dict[str, Any]) -> AdapterConfigBase:
    """Build whichever config class ``data["method"]`` names."""
    return AdapterConfigBase.from_dict(data)


_BIAS_MODES = ("none", "all", "lora_only")
_INIT_MODES = ("kaiming", "gaussian")


@dataclass
class LoRAConfig(AdapterConfigBase):
    """Low-rank adaptation W' = W + (alpha / r) * B @ A (Hu et al. 2021).

    ``target_modules`` selects the linear layers to adapt:

    * a list/tuple of names, each matched as a suffix of whole dotted-name
      components (``"query"`` matches ``bert.encoder.layer.0.attention.self.query``
      but not ``...queryx``);
    * a single string, matched as a full regular expression on the dotted name;
    * ``"all-linear"``: every ``nn.Linear`` / GPT-2 ``Conv1D`` except the output head.

    ``use_dora`` (Liu et al. 2024) learns each output row's length separately:
    W' = m * (W + s B A) / ||W + s B A||_c with m (out,) starting at ||W||_c (see ``peftlab.lora``).
    """

    method: ClassVar[str] = "lora"

    r: int = 8  # rank of the update; params per matrix = r * (in + out)
    alpha: float = 16  # update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)
    dropout: float = 0.0  # dropout on the LoRA branch input only; 0 disables it
    target_modules: tuple[str, ...] | str = ("query", "value")  # BERT attention q/v, as in the paper
    modules_to_save: tuple[str, ...] = ()  # fully trained + saved modules, e.g. ("classifier",)
    bias: str = "none"  # "none" | "all" | "lora_only" (biases of adapted layers)
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    init: str = "kaiming"  # A ~ Kaiming-uniform(a=sqrt(5)) like nn.Linear; "gaussian": A ~ N(0, 1/r^2)
    use_dora: bool = False  # DoRA: also learn a magnitude per output row; params per matrix = r * (in + out) + out

    def __post_init__(self) -> None:
        r = self.r
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            self._fail("r", r, "a positive int", "pick a rank such as 4, 8 or 16")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
            self._fail("alpha", a, "a positive number", "use e.g. alpha = 2 * r (16 for r = 8)")
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            self._fail("dropout", d, "a float in [0, 1)", "use 0.0 (no dropout) or a small value like 0.05 or 0.1")
        self.dropout = float(d)
        self.target_modules = self._check_names("target_modules", self.target_modules, allow_pattern=True)
        self.modules_to_save = self._check_names("modules_to_save", self.modules_to_save, allow_pattern=False)
        if self.bias not in _BIAS_MODES:
            self._fail("bias", self.bias, f"one of {_BIAS_MODES}", 'use "none" unless you want to train biases too')
        if not isinstance(self.use_rslora, bool):
            self._fail("use_rslora", self.use_rslora, "a bool", "pass True or False")
        if self.init not in _INIT_MODES:
            self._fail("init", self.init, f"one of {_INIT_MODES}", 'use "kaiming" (matches HF peft\'s default)')
        if not isinstance(self.use_dora, bool):
            self._fail("use_dora", self.use_dora, "a bool", "pass True (DoRA) or False (plain LoRA)")

    def _check_names(self, field: str, value: Any, allow_pattern: bool) -> tuple[str, ...] | str:
        """Normalise a list of module names to a tuple (or keep a regex string)."""
        if isinstance(value, str):
            if not allow_pattern:
                self._fail(field, value, "a list or tuple of module names", f'wrap it in a list: ["{value}"]')
            if value == "all-linear":
                return value
            if not value:
                self._fail(field, value, "non-empty", 'use e.g. ("query", "value") or "all-linear"')
            try:
                re.compile(value)
            except re.error as exc:
                self._fail(field, value, "a valid regular expression", f"fix the pattern ({exc})")
            return value
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            self._fail(field, value, "a list/tuple of non-empty strings", 'use e.g. ("query", "value")')
        if allow_pattern and not value:
            self._fail(field, value, "non-empty", 'name at least one layer, e.g. ("query", "value"), or "all-linear"')
        return tuple(dict.fromkeys(value))  # dedupe, keep order

    @property
    def scaling(self) -> float:
        """Multiplier of the low-rank branch: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


# --- prefix-tuning and prompt tuning (peftlab/prefix.py, peftlab/prompt.py) -----------
# Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"
# (arXiv:2101.00190); Lester et al. 2021, "The Power of Scale for Parameter-Efficient
# Prompt Tuning" (arXiv:2104.08691). Explained in notebooks/04_prefix_tuning.ipynb.


def _check_virtual_tokens(cfg: AdapterConfigBase) -> None:
    m = cfg.num_virtual_tokens
    if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
        cfg._fail("num_virtual_tokens", m, "a positive int", "use e.g. 8 or 16 virtual tokens")


_PROMPT_INITS = ("auto", "vocab", "random")  # or "text:<words>"; prefix and prompt tuning


def _check_init(cfg: AdapterConfigBase) -> None:
    init = cfg.init
    if not isinstance(init, str) or not (init in _PROMPT_INITS or (init.startswith("text:") and init[5:].strip())):
        cfg._fail("init", init, '"auto", "vocab", "text:<some words>" or "random"',
                  'keep the default "auto" (real tokens\' keys/values or embeddings), or use e.g. '
                  'init="text:Describe the restaurant"')
    if cfg.tokenizer is not None and (not isinstance(cfg.tokenizer, str) or not cfg.tokenizer):
        cfg._fail("tokenizer", cfg.tokenizer, "None or a tokenizer name/folder", "leave None to use the model's own")


def _check_saves(cfg: AdapterConfigBase) -> None:
    v = cfg.modules_to_save
    if isinstance(v, str) or not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x for x in v):
        cfg._fail("modules_to_save", v, "a list/tuple of module names", 'e.g. ("classifier",)')
    cfg.modules_to_save = tuple(dict.fromkeys(v))


@dataclass
class PrefixConfig(AdapterConfigBase):
    """Prefix-tuning: learned keys and values prepended in every attention layer (Li & Liang 2021).

    ``init`` chooses the step-0 prefix; all but ``"random"`` use keys/values the frozen base model
    itself computes for m real tokens (every adapter off), so the prefixed model starts out like
    the base model reading a few words before its input (for a causal model with rotary positions
    exactly that), and with ``projection`` the MLP's last layer is solved to reproduce them:

    * ``"auto"`` (default): the words of ``peftlab.prefix.DEFAULT_PHRASE``, a neutral English
      sentence, read with ``tokenizer`` or the model's own tokenizer (``config._name_or_path``);
      when no tokenizer loads or fits the vocabulary, the tokens of ``"vocab"``;
    * ``"vocab"``: m token ids sampled with a fixed seed from the vocabulary (the first ids, where
      special and unused tokens live, skipped); needs no tokenizer;
    * ``"text:<words>"``: those words (repeated or cut to m tokens); needs a tokenizer;
    * ``"random"``: flat prefixes drawn from N(0, 1) (with ``projection``: PyTorch's default MLP
      init). Not recommended: such keys and values are on no scale the model knows and can swamp
      attention (SmolLM2 on E2E: loss 2.89 -> 9.34 at step 0). Kept for comparisons and old runs.

    Measured step-0 numbers are in tests/test_prefix_real.py. Learning rate: the MLP multiplies every
    step (all m prefix rows move with its shared weights). MiniLM / Rotten Tomatoes, one epoch, seed 2,
    head at 1e-2 (``TrainConfig.head_lr``): through the MLP 0.761 at 1e-3 and one class (chance) from
    2e-3 up ([CLS] states of all sentences alike within 20 steps); flat prefixes
    (``projection=False``) 0.763 at 2e-2 and 0.788 at 5e-2 (with MiniLM's pooler trained too: 0.782,
    0.789, 0.801 and 0.774 at 2e-2, 3e-2, 5e-2 and 1e-1), so ``peftlab.methods`` trains them flat. SmolLM2 / E2E trains well through the MLP at 5e-3 (``peftlab.bench.e2e``).
    """

    method: ClassVar[str] = "prefix"

    num_virtual_tokens: int = 16  # m: prefix length; each layer attends to m extra key/value pairs
    projection: bool = True  # train through an MLP (the paper's stabiliser); merge() folds it to flat tensors
    projection_hidden: int = 256  # hidden width of that MLP (>= m unless init="random")
    # "auto" | "vocab" | "text:<words>": the frozen model's own keys/values for real tokens (see above);
    # "random": N(0, 1) -- WARNING: swamps attention and starts far from the base model; explicit only
    init: str = "auto"
    modules_to_save: tuple[str, ...] = ()  # fully trained + saved modules, e.g. ("classifier",)
    tokenizer: str | None = None  # for "auto" / "text:...": tokenizer name/folder (default: the model's)

    def __post_init__(self) -> None:
        _check_virtual_tokens(self)
        if not isinstance(self.projection, bool):
            self._fail("projection", self.projection, "a bool", "pass True (MLP during training) or False (flat)")
        h = self.projection_hidden
        if isinstance(h, bool) or not isinstance(h, int) or h <= 0:
            self._fail("projection_hidden", h, "a positive int", "use e.g. 256 (the MLP's hidden width)")
        _check_init(self)
        _check_saves(self)


@dataclass
class PromptTuningConfig(AdapterConfigBase):
    """Prompt tuning: m learned input embeddings prepended to the input (Lester et al. 2021).

    ``init`` chooses the step-0 prompt, as for :class:`PrefixConfig`: ``"auto"`` (default) the
    model's input embeddings of ``peftlab.prefix.DEFAULT_PHRASE`` (or of ``"vocab"``'s tokens when
    no tokenizer loads), ``"vocab"`` the embeddings of m token ids sampled with a fixed seed (Lester
    et al.'s "sampled vocabulary"), ``"text:<words>"`` those words' embeddings, ``"random"`` vectors
    drawn from N(0, std^2) with the std of the embedding matrix (not recommended: no real token
    looks like that; explicit only).
    """

    method: ClassVar[str] = "prompt"

    num_virtual_tokens: int = 16  # m: learned vectors prepended to the token embeddings
    # "auto" | "vocab" | "text:<words>": embeddings of real tokens; "random": N(0, std^2), explicit only
    init: str = "auto"
    modules_to_save: tuple[str, ...] = ()  # fully trained + saved modules, e.g. ("classifier",)
    tokenizer: str | None = None  # for "auto" / "text:...": tokenizer name/folder (default: the model's)

    def __post_init__(self) -> None:
        _check_virtual_tokens(self)
        _check_init(self)
        _check_saves(self)


# --- bottleneck adapters (peftlab/adapters.py) -------------------------------------------
# Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP" (arXiv:1902.00751);
# Pfeiffer et al. 2021, "AdapterFusion" (arXiv:2005.00247); He et al. 2022, "Towards a Unified
# View of Parameter-Efficient Transfer Learning" (arXiv:2110.04366).
# Explained in notebooks/05_adapters.ipynb.

_PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
_ACTIVATIONS = ("relu", "gelu", "tanh", "silu")
_ADAPTER_INITS = ("near-identity",)
DEFAULT_BOTTLENECK = 64


@dataclass
class AdapterConfig(AdapterConfigBase):
    """Bottleneck adapter h -> h + s * (W_up f(W_down h + b_down) + b_up) (Houlsby et al. 2019).

    Give the bottleneck width b either directly (``bottleneck``) or as a fraction of the
    model's hidden size d (``reduction_factor``: b = d // reduction_factor); with neither,
    b = 64. b must satisfy 1 <= b <= d, which is checked against the model at inject time.
    """

    method: ClassVar[str] = "adapter"

    bottleneck: int | None = None  # b; parameters per adapter = 2*d*b + b + d
    reduction_factor: float | None = None  # alternative to bottleneck: b = d // reduction_factor
    placement: str = "houlsby"  # "houlsby": after attention and FFN | "pfeiffer": after FFN | "parallel": beside FFN
    activation: str = "relu"  # f: "relu" | "gelu" | "tanh" | "silu"
    init: str = "near-identity"  # W_down like nn.Linear, W_up = b_up = 0: the model starts equal to the base
    scaling: float | None = None  # s; None: 1.0 for houlsby/pfeiffer, 4.0 for parallel (He et al. 2022)
    modules_to_save: tuple[str, ...] = ()  # fully trained + saved modules, e.g. ("classifier",)

    def __post_init__(self) -> None:
        b, rf = self.bottleneck, self.reduction_factor
        if b is not None and rf is not None:
            self._fail("bottleneck", b, "None when reduction_factor is given",
                       f"pass either bottleneck={b} or reduction_factor={rf}, not both")
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b <= 0):
            self._fail("bottleneck", b, "a positive int", "use e.g. 16, 32 or 64 (at most the hidden size)")
        if rf is not None and (isinstance(rf, bool) or not isinstance(rf, (int, float))
                               or not math.isfinite(rf) or rf < 1):
            self._fail("reduction_factor", rf, "a number >= 1", "use e.g. 16 (b = hidden size // 16)")
        if self.placement not in _PLACEMENTS:
            self._fail("placement", self.placement, f"one of {_PLACEMENTS}", 'use "houlsby" (the original)')
        if self.activation not in _ACTIVATIONS:
            self._fail("activation", self.activation, f"one of {_ACTIVATIONS}", 'use "relu" (the default)')
        if self.init not in _ADAPTER_INITS:
            self._fail("init", self.init, f"one of {_ADAPTER_INITS}", 'use "near-identity"')
        s = self.scaling
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0):
            self._fail("scaling", s, "None or a positive number", "leave None (1.0 serial, 4.0 parallel)")
        _check_saves(self)

    @property
    def branch_scaling(self) -> float:
        """s, the multiplier of the adapter branch."""
        if self.scaling is not None:
            return float(self.scaling)
        return 4.0 if self.placement == "parallel" else 1.0

    def bottleneck_size(self, hidden_size: int) -> int:
        """b for a model of hidden size d; raises ``ValueError`` unless 1 <= b <= d."""
        d = hidden_size
        if self.bottleneck is not None:
            b, field = self.bottleneck, "bottleneck"
        elif self.reduction_factor is not None:
            b, field = int(d // self.reduction_factor), "reduction_factor"
            if b < 1:
                self._fail(field, self.reduction_factor, f"at most the hidden size d={d}",
                           f"d // {self.reduction_factor} = 0; use reduction_factor <= {d}")
        else:
            b, field = DEFAULT_BOTTLENECK, "bottleneck"
        if b > d:
            shown = self.bottleneck if self.bottleneck is not None else f"None (default {b})"
            self._fail("bottleneck", shown, f"at most the model's hidden size d={d}",
                       f"an adapter compresses d -> b; use bottleneck <= {d} (e.g. {max(1, d // 16)}) "
                       "or reduction_factor=16")
        return b
