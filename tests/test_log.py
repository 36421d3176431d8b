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


def test_setup_twice_adds_one_handler_and_does_not_propagate_to_root(capsys):
    """A root handler (TorchRec and DeepSpeed install one) must not print package lines again."""
    root_handler = logging.StreamHandler()
    logging.getLogger().addHandler(root_handler)
    try:
        setup_logging("INFO")
        setup_logging("DEBUG")
        pkg = logging.getLogger("goat_dist")
        assert sum(getattr(h, "_goat", False) for h in pkg.handlers) == 1
        get_logger("tests.log").info("printed once")
        assert capsys.readouterr().err.count("printed once") == 1
    finally:
        logging.getLogger().removeHandler(root_handler)
