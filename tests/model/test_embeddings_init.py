"""materialize_(table_sink=): the ID tables' initial rows, generated in chunks for the sink, equal the
full-table initialisation bit for bit, and every other parameter is unchanged (fresh sizes)."""
from __future__ import annotations

import pytest
import torch

import goat_dist.model.embeddings as emb_mod
from goat_dist.model.embeddings import IdEmbeddings, materialize_


class _Model(torch.nn.Module):
    def __init__(self, n_users, n_items, dim):
        super().__init__()
        self.pre = torch.nn.Linear(3, 4, device="meta")
        self.id_emb = IdEmbeddings(n_users, n_items, dim, device="meta")
        self.post = torch.nn.Linear(dim, 2, device="meta")


@pytest.mark.parametrize("n_users,n_items,dim,chunk", [(100, 37, 3, 16), (50, 65, 5, 16), (37, 20, 8, 32),
                                                        (1000, 999, 64, 65536), (33, 17, 1, 16)])
def test_sink_init_equals_full_init(n_users, n_items, dim, chunk, monkeypatch):
    monkeypatch.setattr(emb_mod, "SINK_CHUNK_ROWS", chunk)
    seed = int(torch.randint(0, 1000, ()))
    full = materialize_(_Model(n_users, n_items, dim), "cpu", seed=seed)
    got: dict[str, torch.Tensor] = {"user": torch.full((n_users, dim), float("nan")),
                                    "item": torch.full((n_items, dim), float("nan"))}
    calls = []

    def sink(table, r0, rows):
        calls.append((table, r0, rows.shape[0]))
        got[table][r0:r0 + rows.shape[0]] = rows

    lean = materialize_(_Model(n_users, n_items, dim), "cpu", seed=seed, table_sink=sink)
    for table, t in got.items():
        assert torch.equal(t, full.id_emb.collection.embeddings[table].weight.detach()), table
    assert all(p.device.type == "meta" for p in lean.id_emb.parameters())
    for name in ("pre.weight", "pre.bias", "post.weight", "post.bias"):
        assert torch.equal(dict(lean.named_parameters())[name], dict(full.named_parameters())[name]), name
    assert len(calls) >= 2 and all(n > 0 for _, _, n in calls)
