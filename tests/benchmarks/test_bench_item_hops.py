"""The item-item hops benchmark on a tiny synthetic dataset: the graph outside the ID propagation is
sampled with its GAT's hops only, so its per-modality subgraph is smaller than the baseline's, while
the propagation's graph keeps the baseline's depth and size."""
from __future__ import annotations

import json

from benchmarks import bench_item_hops


def test_per_modality_hops_shrink_only_the_graph_outside_the_propagation(tmp_path):
    out = tmp_path / "hops.json"
    assert bench_item_hops.main([
        "-c", "configs/synthetic.yaml", "--batches", "3", "--repeats", "1", "--out", str(out), "--no-row",
        "--set", f"data.path={tmp_path / 'data'}", "--set", f"graph.cache_dir={tmp_path / 'cache'}",
        "--set", "data.synth={users: 150, items: 80, interactions: 2500, modalities: {image: 12, text: 8}, "
                 "user_profiles: 8, seed: 1}",
        "--set", "graph.item_knn_k=5", "--set", "train.batch_size=256",
        "--set", "sampling.fanouts={user_item: [5, 5, 5], item_item: -1}",
        "--set", "model.gat_layers=1", "--set", "model.item_knn_id_layers=3",
        "--set", "model.item_knn_id_modalities=[image]"]) == 0
    res = json.loads(out.read_text())["modalities"]
    assert res["image"]["baseline"]["hops"] == res["image"]["per_modality"]["hops"] == 3
    assert res["text"]["baseline"]["hops"] == 3 and res["text"]["per_modality"]["hops"] == 1
    assert res["image"]["per_modality"]["mb_per_batch"] == res["image"]["baseline"]["mb_per_batch"]
    assert res["text"]["per_modality"]["mb_per_batch"] < res["text"]["baseline"]["mb_per_batch"]
    assert res["text"]["size_ratio"] > 1
