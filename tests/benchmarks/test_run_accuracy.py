"""benchmarks.run_accuracy keeps what it does not write (the tuning history, the machine)."""
import json

import benchmarks.run_accuracy as ra


def test_main_keeps_other_keys(tmp_path, monkeypatch):
    path = tmp_path / "accuracy.json"
    row = {"name": "tiktok_lightgcn_s0", "test_recall@20": 0.09, "test_ndcg@20": 0.04}
    path.write_text(json.dumps({"rows": [row], "tuning": {"x": 1}, "machine": {"cores": 2}}))
    monkeypatch.setattr(ra, "RESULTS", path)
    assert ra.main(["--collect", "--only", "no_such_row"]) == 0
    out = json.loads(path.read_text())
    assert out["tuning"] == {"x": 1} and out["machine"] == {"cores": 2} and out["rows"] == [row]
    assert out["summary"]["tiktok_lightgcn test_recall@20"]["n"] == 1
