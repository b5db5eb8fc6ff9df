"""timing.median_seconds on a fake clock: warm-up calls are not timed, the median is returned."""

import pytest

import timing


def test_median_seconds_skips_warmup_and_takes_the_median(monkeypatch):
    durations = iter([100.0, 100.0, 1.0, 5.0, 2.0])  # two warm-up calls, then three timed ones
    clock = {"t": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])
    calls = []

    def fn():
        calls.append(1)
        clock["t"] += next(durations)

    assert timing.median_seconds(fn, repeats=3, warmup=2) == 2.0
    assert len(calls) == 5
    with pytest.raises(ValueError, match="repeats"):
        timing.median_seconds(fn, repeats=0)


def test_interleaved_median_seconds_alternates_and_times_each(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])
    order = []

    def make(name, cost):
        def fn():
            order.append(name)
            clock["t"] += cost
        return fn

    medians = timing.interleaved_median_seconds([make("main", 10.0), make("draft", 1.0)], repeats=3, warmup=1)
    assert medians == [10.0, 1.0]
    assert order == ["main", "draft"] * 4  # one warm-up round, then three timed rounds
    with pytest.raises(ValueError, match="repeats"):
        timing.interleaved_median_seconds([make("x", 1.0)], repeats=0)


def test_interleaved_blocks_warm_each_turn_and_time_repeats_calls(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])
    # per function: the warm-up round, then per turn one untimed call (slow here) and the timed ones
    costs = {"a": iter([50.0, 50.0, 1.0, 2.0, 50.0, 3.0]), "b": iter([60.0, 60.0, 5.0, 6.0, 60.0, 7.0])}
    order = []

    def make(name):
        def fn():
            order.append(name)
            clock["t"] += next(costs[name])
        return fn

    # 3 timed calls in blocks of 2: a turn of 2, then a turn cut to 1
    medians = timing.interleaved_median_seconds([make("a"), make("b")], repeats=3, warmup=1, block=2)
    assert order == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 2 + ["b"] * 2
    assert medians == [2.0, 6.0]  # the untimed first call of every turn is never counted
    with pytest.raises(ValueError, match="block"):
        timing.interleaved_median_seconds([make("a")], repeats=1, block=0)
