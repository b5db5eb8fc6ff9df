"""Ctrl-C during a collection stops it within seconds and loses nothing (a few random moments;
``python tests/interrupt_collection.py --trials 20`` runs the full check)."""

from __future__ import annotations

import pytest

from interrupt_collection import STOP_LIMIT_S, one_trial


@pytest.mark.integration
@pytest.mark.parametrize("delay", [2.0, 9.0, 14.5])
def test_ctrl_c_stops_collection_and_keeps_every_finished_episode(tmp_path, delay):
    result = one_trial(delay, str(tmp_path), workers=1)
    assert result.get("stop_seconds") is not None and result["stop_seconds"] <= STOP_LIMIT_S, result
    assert result["output_untouched"] and not result["traceback"], result
    assert result["ok"], result


def _raise_from_interrupt(kind):
    def main(_args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as interrupt:  # as numba's dispatcher re-raises an interrupt
            raise kind("CPUDispatcher(<function opspace_matrices>) returned a result with an "
                       "exception set") from interrupt
    return main


def test_ctrl_c_turned_into_another_error_by_a_library_still_exits_130_without_a_traceback(capsys):
    import argparse

    import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.run(_raise_from_interrupt(SystemError), argparse.ArgumentParser(), [])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().endswith(": interrupted")


def test_an_error_not_caused_by_ctrl_c_is_not_taken_for_one():
    import argparse

    import cli

    def main(_args):
        raise SystemError("a bug")

    with pytest.raises(SystemError, match="a bug"):
        cli.run(main, argparse.ArgumentParser(), [])
    assert not cli.caused_by_interrupt(SystemError("a bug"))
