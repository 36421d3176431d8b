"""Small graphs and slow, obviously-correct references shared by the sampling tests."""
from __future__ import annotations

import torch

from goat_dist.graph.csr import CSR


def random_csr(n_rows: int, n_cols: int, n_edges: int, seed: int, weights: bool = True) -> CSR:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, n_rows, (n_edges,), generator=g)
    cols = torch.randint(0, n_cols, (n_edges,), generator=g)
    vals = torch.rand(n_edges, generator=g) if weights else None
    return CSR.from_edges(rows, cols, n_rows, n_cols, vals)


def adjacency(csr: CSR) -> dict[int, dict[int, float | None]]:
    """row -> {col: weight} in plain Python."""
    out: dict[int, dict[int, float | None]] = {}
    ip, ix = csr.indptr.tolist(), csr.indices.tolist()
    vals = None if csr.values is None else csr.values.tolist()
    for r in range(csr.n_rows):
        out[r] = {ix[e]: (None if vals is None else vals[e]) for e in range(ip[r], ip[r + 1])}
    return out


def full_neighbourhood_reference(graphs: dict, seeds: dict, hops: int):
    """Per hop (seeds outward): node id set per type and global edge set per relation, with
    ``fanout = -1`` semantics (every destination node reached so far takes all its neighbours)."""
    adj = {rel: adjacency(csr) for rel, csr in graphs.items()}
    types = {t for rel in graphs for t in (rel[0], rel[2])}
    nodes = {t: set(seeds.get(t, [])) for t in types}
    out = []
    for _ in range(hops):
        edges = {}
        new = {t: set(v) for t, v in nodes.items()}
        for rel in graphs:
            s, _, d = rel
            es = set()
            for dst in nodes[d]:
                for src, w in adj[rel][dst].items():
                    es.add((src, dst, None if w is None else round(w, 6)))
                    new[s].add(src)
            edges[rel] = es
        nodes = new
        out.append(({t: set(v) for t, v in nodes.items()}, edges))
    return out


def global_edges(block, rel):
    s, _, d = rel
    ei = block.edge_index[rel]
    src = block.src_nodes[s][ei[0]].tolist()
    dst = block.src_nodes[d][ei[1]].tolist()
    w = block.edge_weight.get(rel)
    ws = [None] * len(src) if w is None else [round(x, 6) for x in w.tolist()]
    return list(zip(src, dst, ws))


def chi_square_uniform(counts: torch.Tensor) -> float:
    """Pearson's statistic of ``counts`` against the uniform distribution over its cells."""
    counts = counts.to(torch.float64)
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


# Chi-square critical values at alpha = 0.001 (scipy.stats.chi2.ppf(0.999, df), precomputed so the
# tests need no scipy). A fixed generator seed keeps each test deterministic.
CHI2_CRIT_999 = {9: 27.877, 14: 36.123, 19: 43.820, 29: 58.301, 34: 65.247, 44: 78.750}


def chi2_critical_999(df: int) -> float:
    """Upper 0.1% point of chi-square(df): the table above, else the Wilson-Hilferty approximation
    (within 1% of the exact value for df >= 5; z = 3.0902 is the standard normal 0.999 quantile)."""
    if df in CHI2_CRIT_999:
        return CHI2_CRIT_999[df]
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + 3.0902 * a ** 0.5) ** 3
