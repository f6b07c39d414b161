"""Balanced timing order and the clock the benchmarks judge with (issue 11, item 15)."""

import itertools
import time
from collections import Counter

import pytest

from peftlab.bench import lora as lora_bench
from peftlab.bench.timing import balanced_orders, interleaved_times, summary


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_balanced_orders_positions_and_precedence(k):
    names = [f"v{i}" for i in range(k)]
    orders = balanced_orders(names, 2 * k)
    assert all(sorted(o) == names for o in orders)
    # every variant in every position equally often
    for pos in range(k):
        assert Counter(o[pos] for o in orders) == Counter({n: 2 for n in names})
    # every ordered pair as often one way as the other (ABBA)
    for a, b in itertools.permutations(names, 2):
        before = sum(o.index(a) < o.index(b) for o in orders)
        assert before == len(orders) - before


def test_balanced_orders_rejects_no_rounds():
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        balanced_orders(["a", "b"], 0)


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_interleaved_times_measures_cpu_work_and_spread():
    out = interleaved_times({"short": lambda: _burn(0.004), "long": lambda: _burn(0.012)}, rounds=6, warmup=0)
    cpu = out["cpu"]
    assert cpu["long"]["median"] / cpu["short"]["median"] == pytest.approx(3.0, rel=0.35)
    for s in cpu.values():
        assert s["rounds"] == 6 and s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]


def test_bench_judges_cpu_runs_by_cpu_time_not_wall_time():
    # a sleeping call costs wall time but almost no CPU time: the CPU clock must not count it
    sleepy = lora_bench._time({"sleep": lambda: time.sleep(0.02), "burn": lambda: _burn(0.01)}, 0, 4, 1, "cpu")
    assert sleepy["sleep"]["median"] < 0.005 < sleepy["burn"]["median"]


def test_summary_of_one_sample_and_of_none():
    assert summary([2.0])["median"] == summary([2.0])["q1"] == 2.0
    with pytest.raises(ValueError, match="no samples"):
        summary([])
