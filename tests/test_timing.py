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
