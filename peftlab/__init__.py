"""peftlab: parameter-efficient fine-tuning, implemented to be read.

The package behind the peftlab course (``notebooks/``): LoRA, IA³, prefix-tuning and prompt
tuning, bottleneck adapters, training, evaluation and visualisation, for transformers 5
models on the CPU or CUDA. Importing it loads no model and touches no network; the
heavier helpers (``peftlab.viz``, ``peftlab.search``, ``peftlab.bench``) are imported on use.
"""

from peftlab import data, hub, runtime

# the methods' own modules, reachable as peftlab.lora, peftlab.prefix, ... (registration does not
# depend on these imports: peftlab.registry finds each method's record when it is first needed)
from peftlab import adapters, ia3, lora, prefix, prompt
# serving many adapters at once, and the instruction-tuning capstone (notebooks 11 and 13)
from peftlab import chat, serving
from peftlab.arithmetic import add_weighted_adapter
from peftlab.config import AdapterConfig, LoRAConfig, PrefixConfig, PromptTuningConfig
from peftlab.ia3 import IA3Config
from peftlab.data import load_e2e, load_sentiment
from peftlab.hub import load_model
from peftlab.inject import (count_parameters, delete, disabled, explain, inject, merge, set_active,
                            unload, unmerge)
from peftlab.io import load_adapter, save_adapter
from peftlab.runtime import get_device, quick_mode, seed_everything
from peftlab.train import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # methods: their modules and configs
    "adapters",
    "ia3",
    "lora",
    "prefix",
    "prompt",
    "AdapterConfig",
    "IA3Config",
    "LoRAConfig",
    "PrefixConfig",
    "PromptTuningConfig",
    # putting adapters in, inspecting them, switching them, taking them out
    "count_parameters",
    "delete",
    "disabled",
    "explain",
    "inject",
    "load_adapter",
    "merge",
    "save_adapter",
    "set_active",
    "unload",
    "unmerge",
    # many adapters: mixed batches and hot-swap, weighted combinations; chat data for decoders
    "add_weighted_adapter",
    "chat",
    "serving",
    # training
    "TrainConfig",
    "train",
    # models, data, runtime
    "data",
    "get_device",
    "hub",
    "load_e2e",
    "load_model",
    "load_sentiment",
    "quick_mode",
    "runtime",
    "seed_everything",
]
