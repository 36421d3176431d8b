"""The rank-aware logger: rank 0 logs at the configured level, other ranks only warnings."""
from __future__ import annotations

import logging

from goat_dist.log import get_logger, setup_logging


def test_rank_filter_and_stream_follow_current_stderr(monkeypatch, capsys):
    setup_logging("INFO")
    log = get_logger("tests.log")
    log.info("hello from rank zero")
    assert "hello from rank zero" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    log.info("info from rank one")
    log.warning("warning from rank one")
    err = capsys.readouterr().err
    assert "info from rank one" not in err and "[rank 1] WARNING" in err and "warning from rank one" in err


def test_setup_twice_adds_one_handler_and_caplog_sees_records(caplog):
    setup_logging("INFO")
    setup_logging("DEBUG")
    root = logging.getLogger("goat_dist")
    assert sum(getattr(h, "_goat", False) for h in root.handlers) == 1
    with caplog.at_level(logging.INFO, logger="goat_dist"):
        get_logger("tests.log").info("seen by caplog")
    assert "seen by caplog" in caplog.text
