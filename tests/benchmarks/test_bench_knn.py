"""The kNN benchmark on tiny inputs: both modes write an entry whose recall against the brute-force
reference is exactly 1 for the exact backend, and the graph-only mode reports the search and CSR
phases of its single knn_graph call."""
from __future__ import annotations

import json

import pytest

from benchmarks import bench_knn


@pytest.mark.parametrize("mode", [[], ["--graph-only"]])
def test_exact_backend_recall_is_one_in_both_modes(tmp_path, mode):
    out = tmp_path / "knn.json"
    assert bench_knn.main(["--n", "700", "--d", "8", "--k", "4", "--backend", "exact", "--recall-queries", "50",
                           "--threads", "1", "--out", str(out), *mode]) == 0
    entry = json.loads(out.read_text())["runs"]["exact@700"]
    assert entry["recall_at_k"] == 1.0 and entry["recall_queries"] == 50
    assert entry["knn_graph_nnz"] > 700 * 4  # symmetrised + self-loops
    assert entry["mode"] == ("graph-only" if mode else "search, then graph")
    if mode:
        assert 0 <= entry["search_seconds"] <= entry["knn_graph_seconds"]
        assert entry["csr_build_seconds"] is not None and entry["csr_build_seconds"] <= entry["knn_graph_seconds"]
    else:
        assert entry["csr_build_seconds"] is None


def test_approximate_backend_recall_below_one_is_reported(tmp_path):
    out = tmp_path / "knn.json"
    assert bench_knn.main(["--n", "2000", "--d", "16", "--k", "10", "--backend", "ivf", "--nprobe", "1",
                           "--recall-queries", "100", "--graph-only", "--out", str(out)]) == 0
    entry = json.loads(out.read_text())["runs"]["ivf@2000/nprobe1"]
    assert 0 < entry["recall_at_k"] < 1.0  # one probed list of ~180 on gaussian rows misses neighbours


def test_modes_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit):
        bench_knn.main(["--n", "100", "--search-only", "--graph-only", "--out", str(tmp_path / "k.json")])
