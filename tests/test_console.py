"""Progress: a bar on a terminal, log lines elsewhere, and an estimated total that may be wrong."""

from __future__ import annotations

import logging

import pytest

from saige_k8s import console


def test_off_a_terminal_progress_is_log_lines_with_the_time_left(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("saige_k8s.test")
    progress = console.progress("rows", " rows", 1000, log=log, every_s=0)
    with caplog.at_level(logging.INFO, logger=log.name):
        progress.update(250)
        progress.update(750)
        progress.update(10)  # past an estimate that was too low: no "of about", no negative time left
    first, _, past = caplog.messages
    assert first.startswith("rows: 250 of about 1,000 rows (25 %), ")
    assert first.endswith(" left")
    assert past.startswith("rows: 1,010 rows, ") and "about" not in past
    assert not progress.on_screen


def test_log_lines_wait_for_their_interval(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("saige_k8s.test")
    progress = console.progress("rows", " rows", None, log=log, every_s=3600)
    with caplog.at_level(logging.INFO, logger=log.name):
        for _ in range(100):
            progress.update(1)
    assert caplog.messages == []


def test_without_a_logger_or_when_disabled_nothing_is_shown(capsys: pytest.CaptureFixture[str]) -> None:
    for progress in (console.progress("rows", "row", 10), console.progress("rows", "row", 10, enabled=False)):
        progress.update(5)
        progress.set_postfix(loss="1")
        progress.close()
    assert capsys.readouterr().err == ""


def test_on_a_terminal_a_total_that_was_too_low_grows_with_the_count(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(console, "interactive", lambda: True)
    # disable=False: tqdm takes TQDM_DISABLE's default once, at import, and a CLI test may have set it.
    progress = console.progress("rows", " rows", 100, mininterval=0, disable=False)
    assert progress.on_screen
    progress.update(60)
    progress.update(90)
    progress.close()
    drawn = capsys.readouterr().err
    assert "60/100" in drawn
    assert "150/150" in drawn and "150/100" not in drawn
