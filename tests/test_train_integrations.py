"""peftlab models under HF Trainer, and peftlab.train under `accelerate launch`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from train_helpers import tiny_bert, toy_classification

TESTS = Path(__file__).resolve().parent


def _lora_model():
    from peftlab.config import LoRAConfig
    from peftlab.inject import inject

    model = tiny_bert()
    inject(model, LoRAConfig(r=4, alpha=8, modules_to_save=("classifier",)))
    return model


def test_peftlab_lora_trains_under_hf_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from peftlab.data import PadCollator
    from peftlab.metrics import _Pad

    model = _lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # transformers 5 names: eval_strategy (not evaluation_strategy), processing_class (not tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, eval_strategy="steps", eval_steps=3,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=toy_classification(16),
                      eval_dataset=toy_classification(8, seed=1), data_collator=PadCollator(_Pad(0)))
    out = trainer.train()
    assert out.global_step == 3
    assert "eval_loss" in trainer.evaluate()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n or "modules_to_save" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_the_seed_posts_trainer_arguments_fail_under_transformers_5(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="evaluation_strategy"):
        TrainingArguments(output_dir=str(tmp_path), evaluation_strategy="epoch", report_to=[])


SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import torch
    from safetensors.torch import save_file
    from peftlab.train import TrainConfig, train
    from train_helpers import freeze_all_but, tiny_bert, toy_classification

    model = freeze_all_but(tiny_bert(), "classifier", "query", "value")
    res = train(model, toy_classification(32), toy_classification(8, seed=1),
                TrainConfig(lr=1e-2, batch_size=4, max_steps=4, progress=False))
    rank = int(os.environ["RANK"])
    save_file({{n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}},
              os.path.join({out!r}, f"rank{{rank}}.safetensors"))
    with open(os.path.join({out!r}, f"rank{{rank}}.txt"), "w") as fh:
        fh.write(f"{{os.environ['WORLD_SIZE']}} {{res.history[0]['loss']:.8f}} {{res.steps}}")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_agree(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # accelerate 1.15: `--cpu --num_processes 2` starts ONE process unless MPI is set up;
    # `--multi_gpu` goes through torchrun, which on a machine without CUDA gives 2 CPU ranks (gloo)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    (ws0, loss0, steps0), (ws1, loss1, steps1) = [
        (tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ws0 == ws1 == "2" and steps0 == steps1 == "4"
    assert loss0 != loss1  # each rank saw its own shard of the batch
    before = tiny_bert()
    assert not torch.equal(before.classifier.weight, w0["classifier.weight"])
