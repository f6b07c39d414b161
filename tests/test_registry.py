"""One method registry: generic code knows no method, a new method plugs in like the built-in ones,
and no peftlab module imports another in a cycle or only for a side effect."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import peftlab
from peftlab import registry
from peftlab.config import AdapterConfigBase, AdapterConfig, LoRAConfig, PrefixConfig, PromptTuningConfig
from peftlab.inject import configs, count_parameters, delete, inject, merge, unload
from peftlab.io import FORMAT_VERSION, load_adapter, read_adapter_json, save_adapter

PACKAGE = Path(peftlab.__file__).parent


def _bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


# -- a method the package does not know: output logits scaled by a learned vector -----------
@dataclass
class ScaleConfig(AdapterConfigBase):
    method = "test-scale"
    init: float = 1.0


def _toy_inject(model, config, name):
    bank = model._modules.get("scale_tuning") or nn.ParameterDict()
    model.add_module("scale_tuning", bank)
    bank[name] = nn.Parameter(torch.full((model.config.num_labels,), config.init))
    if "scale_hook" not in model.__dict__:
        def hook(mod, args, out):
            active = registry.active_adapter(mod)
            if active in mod.scale_tuning and not registry.adapters_disabled(mod):
                out.logits = out.logits * mod.scale_tuning[active]
            return out
        model.__dict__["scale_hook"] = model.register_forward_hook(hook)


def _toy_save(model, name):
    return ({"scale": model.scale_tuning[name]},
            {"peftlab": {"format_version": FORMAT_VERSION, "adapter_name": name,
                         "config": configs(model)[name].to_dict()}})


def _toy_load(model, d, name, tensors):
    config = ScaleConfig.from_dict(read_adapter_json(d)["peftlab"]["config"])
    inject(model, config, name)
    with torch.no_grad():
        model.scale_tuning[name].copy_(tensors["scale"])
    return model


CALLS: list[str] = []


def _spy(fn, label):
    def call(*args):
        CALLS.append(label)
        return fn(*args)
    return call


TOY = registry.MethodHooks(
    method="test-scale", config=ScaleConfig, inject=_toy_inject,
    mark_trainable=lambda model, config, name: model.scale_tuning[name].requires_grad_(True),
    delete=lambda model, name: model.scale_tuning.pop(name), save=_spy(_toy_save, "save"), load=_toy_load,
    owns=lambda n: n.startswith("scale_tuning."))


def test_a_new_method_works_through_every_generic_operation(tmp_path):
    registry.register(TOY)
    model, x = _bert(), torch.randint(0, 50, (2, 5))
    base = model(input_ids=x).logits
    inject(model, ScaleConfig(init=2.0), "twice")
    torch.testing.assert_close(model(input_ids=x).logits, 2 * base)
    count = count_parameters(model)
    assert count.by_kind["test-scale"] == 2 and count.trainable == 2
    with peftlab.disabled(model):
        torch.testing.assert_close(model(input_ids=x).logits, base)
    CALLS.clear()
    save_adapter(model, tmp_path / "toy", "twice")
    assert CALLS == ["save"]  # one dispatch, one state dict, one writer
    assert load_file(str(tmp_path / "toy" / "adapter_model.safetensors"))["scale"].tolist() == [2.0, 2.0]
    fresh = load_adapter(_bert(), tmp_path / "toy", "twice")
    torch.testing.assert_close(fresh(input_ids=x).logits, 2 * base)
    with pytest.raises(RuntimeError, match="cannot be merged"):  # the default for methods without a merge hook
        merge(fresh)
    with pytest.raises(RuntimeError, match="cannot be unloaded"):
        unload(fresh)
    delete(model, "twice")
    assert "twice" not in configs(model) and not any(p.requires_grad for p in model.parameters())


def test_unknown_config_and_method_are_refused_by_name():
    @dataclass
    class Nope(AdapterConfigBase):
        method = "test-nope"

    with pytest.raises(TypeError, match="Nope.*supported configs are LoRAConfig"):
        inject(_bert(), Nope())
    with pytest.raises(KeyError, match="no peftlab method 'vera'"):
        registry.hooks_for_method("vera")
    bad = registry.MethodHooks(method="lora", config=ScaleConfig, inject=_toy_inject, mark_trainable=print,
                               delete=print, save=_toy_save, load=_toy_load, owns=bool)
    with pytest.raises(ValueError, match="ScaleConfig.method is 'test-scale'"):
        registry.register(bad)


def test_every_builtin_method_has_its_record():
    records = {h.method: h for h in registry.all_hooks()}
    for config in (LoRAConfig(), PrefixConfig(), PromptTuningConfig(), AdapterConfig()):
        assert registry.hooks_for(config) is records[config.method]
    assert records["lora"].owns("bert.encoder.layer.0.attention.self.query.lora_A.default.weight")
    assert records["prefix"].owns("prefix_tuning.default.prefix_embedding")
    assert not records["prefix"].owns("bert.embeddings.word_embeddings.weight")


# -- the generic modules name no method --------------------------------------------------------
@pytest.mark.parametrize("module", ["inject.py", "io.py", "registry.py", "tree.py", "wrappers.py"])
def test_generic_modules_know_no_method_by_name(module):
    code = _code_only(PACKAGE / module)
    for word in ("LoRALinear", "LoRAConfig", "PrefixConfig", "PromptTuningConfig", "AdapterConfig", "prefix_tuning",
                 "prompt_tuning", "lora_A", "from .lora", "from .prefix", "from .prompt", "from .adapters"):
        assert word not in code, f"{module} names {word!r}"


def _code_only(path: Path) -> str:
    """The source without docstrings and comments (what runs)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            body[0].value.value = ""
    return ast.unparse(tree)


# -- imports: no cycle, none that matters only for its side effect ---------------------------
def _module_imports() -> dict[str, set[str]]:
    """peftlab module -> the peftlab modules it imports at module level (not inside functions)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                if base.startswith("peftlab"):
                    for alias in node.names:
                        sub = f"{base}.{alias.name}"
                        deps.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() else base)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("peftlab")}
        graph[name] = {d for d in deps if d != name}
    return graph


def test_no_import_cycles_between_peftlab_modules():
    graph = _module_imports()
    done, path = set(), []

    def visit(mod):
        if mod in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(mod):] + [mod]))
        if mod in done or mod not in graph:
            return
        path.append(mod)
        for dep in sorted(graph[mod]):
            if dep != "peftlab" and not mod.startswith(dep + "."):  # a sub-module may import its package
                visit(dep)
        path.pop()
        done.add(mod)

    for mod in sorted(graph):
        visit(mod)


def test_no_import_is_there_only_for_its_side_effect():
    offenders = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if line.lstrip().startswith(("import ", "from ")) and "F401" in line]
    assert not offenders, offenders


SCRIPT = textwrap.dedent("""
    import importlib, sys, tempfile
    importlib.import_module(sys.argv[1])  # the first peftlab module this program imports
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    from peftlab.config import AdapterConfig, LoRAConfig, PrefixConfig, PromptTuningConfig
    from peftlab.inject import inject
    from peftlab.io import load_adapter, save_adapter

    def bert():
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32, num_labels=2)
        return BertForSequenceClassification(cfg).eval()

    x = torch.randint(0, 50, (2, 5))
    for config in (LoRAConfig(r=2, target_modules=("query",), init="gaussian"),
                   PrefixConfig(num_virtual_tokens=2, init="random"),
                   PromptTuningConfig(num_virtual_tokens=2, init="random"), AdapterConfig(bottleneck=4)):
        model = inject(bert(), config)
        with tempfile.TemporaryDirectory() as d:
            save_adapter(model, d)
            again = load_adapter(bert(), d)
        assert torch.allclose(model(input_ids=x).logits, again(input_ids=x).logits), config
    print("ok")
""")


@pytest.mark.parametrize("first", ["peftlab.io"])  # any module: each method's record is found on first use
def test_whichever_module_is_imported_first_every_method_saves_and_loads(first):
    out = subprocess.run([sys.executable, "-c", SCRIPT, first], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
