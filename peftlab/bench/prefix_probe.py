"""One prefix-tuning run on MiniLM / Rotten Tomatoes with the table's budget, as one JSON line.

``python -m peftlab.bench.prefix_probe --seed 2 --lr 5e-2 [--head-lr 1e-2] [--mlp] [--pooler]
[--init auto] [--m 16]`` trains a prefix (flat, or through the MLP with ``--mlp``) and the
classifier head (``--pooler``: MiniLM's pooler too, both at ``--head-lr``) for one epoch, batch 32,
max length 64, 6 % warm-up then linear decay (``peftlab.bench.table``'s budget and splits), and
prints test accuracy, F1 and the last logged training loss. The learning-rate and recipe choices
written in ``peftlab.methods`` and ``PrefixConfig``'s docstring were measured with it, one run at a
time on the idle 2-core machine (~100 s each).
"""

from __future__ import annotations

import argparse
import json
import time

__all__ = ["probe"]


def probe(seed: int, lr: float, head_lr: float | None = 1e-2, mlp: bool = False, pooler: bool = False,
          init: str = "auto", m: int = 16) -> dict:
    import peftlab
    from peftlab import metrics
    from peftlab.bench.table import BenchSettings, _setup
    from peftlab.config import PrefixConfig
    from peftlab.data import tokenize_classification
    from peftlab.inject import inject
    from peftlab.train import TrainConfig, train

    s = BenchSettings()
    train_ds, test_ds = _setup(s, seed)
    model, tok = peftlab.load_model("minilm", task="classification", num_labels=2, seed=seed)
    saves = ("bert.pooler", "classifier") if pooler else ("classifier",)
    inject(model, PrefixConfig(num_virtual_tokens=m, projection=mlp, init=init, modules_to_save=saves))
    start = time.perf_counter()
    result = train(model, tokenize_classification(train_ds, tok, s.max_length), None,
                   TrainConfig(lr=lr, head_lr=head_lr, batch_size=s.batch_size, epochs=s.epochs, warmup=0.06,
                               seed=seed, progress=False))
    scores = metrics.evaluate_classifier(model, tokenize_classification(test_ds, tok, s.max_length))
    return {"seed": seed, "lr": lr, "head_lr": head_lr, "mlp": mlp, "pooler": pooler, "init": init, "m": m,
            "accuracy": round(scores["accuracy"], 4), "f1": round(scores["f1"], 4),
            "last_loss": round(result.history[-1]["loss"], 4), "seconds": round(time.perf_counter() - start)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m peftlab.bench.prefix_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--head-lr", type=float, default=1e-2, help="the head's (and pooler's) peak rate")
    parser.add_argument("--mlp", action="store_true", help="train through the reparameterisation MLP")
    parser.add_argument("--pooler", action="store_true", help="train MiniLM's pooler with the head")
    parser.add_argument("--init", default="auto", help='PrefixConfig.init: "auto", "vocab", "text:...", "random"')
    parser.add_argument("--m", type=int, default=16, help="virtual tokens")
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.seed, args.lr, args.head_lr, args.mlp, args.pooler, args.init, args.m)))


if __name__ == "__main__":
    main()
