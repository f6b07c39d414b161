"""The benchmarks behind the README's tables: measuring peftlab, not part of what it teaches.

The notebooks show their results (``notebooks/07_training.ipynb``, "The reference table", and
the reference rows printed in notebooks 01, 02, 04, 05 and 07-09, 11-13); the modules:

* ``table``: the reference table, every method on MiniLM / Rotten Tomatoes (``peftlab bench``);
* ``lora``: LoRA step time, inference time, memory and file size (``python -m peftlab.bench lora``);
* ``speed``: ``peftlab.train`` against HF Trainer + peft (``python -m peftlab.bench speed``);
* ``e2e``: prefix-tuning and LoRA on SmolLM2 / E2E NLG, BLEU (``python -m peftlab.bench e2e``);
* ``throughput``: training / generation tokens per second and serving latency per method
  (``python -m peftlab.bench.throughput prefix|serve``);
* ``mixed``: a mixed batch of k LoRA adapters against separate runs and merged copies, throughput
  and memory (``python -m peftlab.bench mixed``, notebook 11);
* ``arithmetic``: Rotten Tomatoes and IMDB adapters, merged every way, scored on both test sets
  (``python -m peftlab.bench.arithmetic``, notebook 12);
* ``chat``: the capstone's recipe, instruction-tuning SmolLM2 with LoRA on chat-formatted E2E, over
  seeds (``python -m peftlab.bench.chat``, notebook 13);
* ``timing``: the balanced, interleaved timing they all judge with;
* ``cli``: the ``python -m peftlab.bench`` command line.

Importing this package imports none of them (and no torch).
"""
