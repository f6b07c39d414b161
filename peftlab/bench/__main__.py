"""``python -m peftlab.bench lora|speed|e2e ...``: the command line of ``peftlab.bench.cli``."""

from peftlab.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
