"""Seeding, device choice and the course's quick mode.

Every notebook's setup cell calls these (explained in ``notebooks/00_setup_check.ipynb``,
section "Class mode and quick mode").
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

QUICK_ENV = "PEFTLAB_QUICK"
# Set by the test command: a notebook run under it must see quick mode, or the run is
# not the one CI thinks it is (see ``assert_quick_reached``).
EXPECT_QUICK_ENV = "PEFTLAB_EXPECT_QUICK"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def seed_everything(seed: int = 0, *, deterministic: bool = False) -> int:
    """Seed Python, NumPy and torch (CPU and every CUDA device); return the seed.

    ``deterministic=True`` also asks torch for deterministic kernels, which can be
    slower on a GPU; on the CPU the course is deterministic without it.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return seed


def get_device(prefer: str | None = None) -> torch.device:
    """Pick the device to run on: CUDA, then Apple's MPS, then the CPU.

    ``prefer`` (or the ``PEFTLAB_DEVICE`` variable) forces one, e.g. ``"cpu"`` to compare.
    """
    prefer = prefer or os.environ.get("PEFTLAB_DEVICE") or None
    if prefer is not None:
        device = torch.device(prefer)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"device {prefer!r} was asked for but torch sees no CUDA device "
                f"(torch {torch.__version__}); install a CUDA build of torch or use 'cpu'"
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def physical_cores() -> int:
    """Physical CPU cores available to this process (hyper-threads do not count)."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ModuleNotFoundError:
        cores = None
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or available or 1, available or 1))


def use_physical_cores() -> int:
    """Let torch's CPU kernels use one thread per physical core; return the thread count.

    Extra threads on hyper-threads (or on cores the process may not use) make matrix
    products slower, not faster. ``PEFTLAB_THREADS`` overrides the choice; a count set
    earlier with ``torch.set_num_threads`` below the core count is kept.
    """
    wanted = os.environ.get("PEFTLAB_THREADS")
    n = int(wanted) if wanted else physical_cores()
    if wanted or torch.get_num_threads() > n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def quick_mode() -> bool:
    """True when ``PEFTLAB_QUICK`` asks for the shrunken CI run of the notebooks.

    Quick mode shrinks step counts and data sizes; it never skips a teaching cell.
    """
    raw = os.environ.get(QUICK_ENV, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{QUICK_ENV}={raw!r} is not understood: use 1 (quick) or 0 (class mode)")


def assert_quick_reached() -> bool:
    """Fail loudly when the test run expected quick mode but this process does not see it.

    The test command exports both ``PEFTLAB_QUICK=1`` and ``PEFTLAB_EXPECT_QUICK=1``;
    every notebook's setup cell calls this, so a kernel that lost the variable fails
    instead of silently running the long class-mode version.
    """
    expected = os.environ.get(EXPECT_QUICK_ENV, "").strip().lower() in _TRUE
    if expected and not quick_mode():
        raise RuntimeError(
            f"{EXPECT_QUICK_ENV} is set but {QUICK_ENV} did not reach this kernel: "
            "the notebook would run in class mode. Export PEFTLAB_QUICK=1 before starting it."
        )
    return quick_mode()


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The reduced-precision dtype to autocast to on ``device``, or None for plain fp32.

    bf16 on CUDA devices that support it (Ampere and newer), else fp16 on CUDA;
    on the CPU and MPS the course trains in fp32 by default. bf16 autocast on the CPU is
    available on request (``TrainConfig(precision="bf16")``, ``peftlab bench --bf16``): about 2x
    faster than fp32 on CPUs with native bf16 (AVX512-BF16 / AMX, as the course's machines:
    README, "The whole table in 30 minutes"), slower than fp32 on CPUs without it.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def describe() -> dict[str, str]:
    """Versions and device, as shown by the setup-check notebook."""
    import platform

    import transformers

    device = get_device()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "threads": str(torch.get_num_threads()),
        "quick mode": str(quick_mode()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
