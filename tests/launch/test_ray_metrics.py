"""What the Ray workers report: nested metrics flattened to scalars, the worker start records."""
from __future__ import annotations

import json

import torch

from launch.ray_job import WORKERS_FILE, _read_starts, _record_worker, flat_metrics


def test_flat_metrics_flattens_and_converts():
    final = {"best_epoch": 3, "selected_on": "valid", "valid": {"recall@10": 0.5, "ndcg@10": 0.25},
             "test": None, "steps": 92, "loss": torch.tensor(1.5), "nested": {"a": {"b": True}}, "vec": [1, 2]}
    out = flat_metrics(final)
    assert out == {"best_epoch": 3, "selected_on": "valid", "valid/recall@10": 0.5, "valid/ndcg@10": 0.25,
                   "steps": 92, "loss": 1.5, "nested/a/b": True, "vec": "[1, 2]"}
    assert isinstance(out["loss"], float)


def test_worker_start_records(tmp_path):
    _record_worker(tmp_path / "run", 1, 2, 0, False)
    _record_worker(tmp_path / "run", 0, 2, 20, True)
    starts = _read_starts(tmp_path / "run")
    assert [(s["rank"], s["world_size"], s["step"], s["resumed"]) for s in starts] == [(1, 2, 0, False), (0, 2, 20, True)]
    assert all(isinstance(s["pid"], int) and s["pid"] > 0 for s in starts)
    lines = (tmp_path / "run" / WORKERS_FILE).read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["event"] == "start"
