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
