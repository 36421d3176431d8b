"""Synthetic industrial-scale recommendation data with a planted, learnable structure.

Generative model (a mixed-membership "planted cluster" model; everything seeded):
- ``K`` latent clusters with centres ``z_c ~ N(0, I_k)``. Item ``i`` belongs to cluster ``c_i``
  (uniform) and has a Zipf popularity weight ``w_i = (1 + rank_i)^-a`` (random ranks); its latent
  factor is ``q_i = z_{c_i} + 0.5 * noise``.
- User ``u`` has ``M = 3`` preferred clusters ``c_{u1..uM}`` (drawn by cluster mass) with weights
  ``pi_u ~ Dirichlet(0.5)``; its latent factor is ``p_u = sum_j pi_uj z_{c_uj}``.
- User degrees are power-law (Pareto, exponent ``ALPHA``), stochastically rounded and adjusted so
  that they sum to exactly ``interactions``; each user's items are drawn without replacement from

      P(i | u) = (1 - mu) * sum_j pi_uj [c_i = c_uj] w_i / W_{c_uj}  +  mu * w_i / W

  (``W_c`` = popularity mass of cluster c, ``W`` = total): affinity-driven, mixed with popularity.
  So item degrees are power-law too, and ranking by ``P(i | u)`` (the *oracle*, see
  ``oracle_scores``) beats ranking by popularity by a wide margin: a collaborative model has
  something to learn.
- Item modality ``m`` = noisy random projection of the latent factors,
  ``x_i^m = q_i R_m / sqrt(k) + sigma_m * noise`` (aligning modalities with IDs helps); user
  preference embeddings (``user_profile.npy``) = ``p_u R_u / sqrt(k) + noise``.
- Each user's drawn items are split 8:1:1 into train/valid/test (stochastic rounding per user,
  every user keeps >= 1 train item).

Scale: users are generated in chunks (about ``CHUNK_INTERACTIONS`` draws each) and streamed to
``train.txt``/``valid.txt``/``test.txt`` (numpy text formatting) and to ``.npy`` files whose header is
written first, so memory stays bounded (global state: a few int32 arrays over users and items).
Determinism: random streams are keyed by (seed, purpose, chunk), so the output depends only on the
arguments, and ``oracle_scores`` can regenerate any user's preferences from ``_latent.npz``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from goat_dist.data.adjacency import format_adjacency
from goat_dist.data.fsio import join, makedirs, open_url
from goat_dist.log import get_logger, progress

log = get_logger(__name__)

ALPHA = 1.7  # Pareto exponent of user degrees
ZIPF_A = 0.9  # item popularity exponent
MU = 0.2  # share of draws from global popularity
M_PREF = 3  # preferred clusters per user
LATENT_DIM = 32
CHUNK_INTERACTIONS = 4_000_000
ITEM_CHUNK = 1 << 18
SPLIT_RATIO = (0.8, 0.1, 0.1)
LATENT_FILE = "_latent.npz"

# stream ids of np.random.default_rng([seed, STREAM, chunk])
_S_ITEMS, _S_DEGREES, _S_USERPREF, _S_DRAWS, _S_SPLIT, _S_PROJ, _S_ITEMNOISE, _S_USERNOISE = range(8)


@dataclass(slots=True)
class SynthLatent:
    """The planted structure, enough to score any (user, item): see the module docstring."""

    n_users: int
    n_items: int
    seed: int
    chunk_users: int
    mu: float
    item_cluster: np.ndarray  # [I] int32
    item_weight: np.ndarray  # [I] float64 popularity w_i
    cluster_mass: np.ndarray  # [K] float64 W_c
    centers: np.ndarray  # [K, k] float32

    @property
    def n_clusters(self) -> int:
        return int(self.cluster_mass.shape[0])


def _n_clusters(items: int) -> int:
    return int(np.clip(items // 40, 4, 256))


def _items_side(items: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item_cluster [I], item_weight [I], centers [K, k])."""
    rng = np.random.default_rng([seed, _S_ITEMS])
    k_clusters = _n_clusters(items)
    cluster = rng.integers(0, k_clusters, size=items).astype(np.int32)
    rank = rng.permutation(items)
    weight = (1.0 + rank) ** -ZIPF_A
    centers = rng.standard_normal((k_clusters, LATENT_DIM)).astype(np.float32)
    return cluster, weight, centers


def _degrees(users: int, items: int, interactions: int, seed: int) -> np.ndarray:
    """Power-law user degrees, each in [1, items // 2], summing to exactly ``interactions``."""
    rng = np.random.default_rng([seed, _S_DEGREES])
    cap = max(1, items // 2)
    raw = rng.pareto(ALPHA, size=users) + 1.0
    scaled = raw * (interactions / raw.sum())
    deg = np.floor(scaled + rng.random(users)).astype(np.int64)
    np.clip(deg, 1, cap, out=deg)
    for _ in range(1000):
        residual = interactions - int(deg.sum())
        if residual == 0:
            break
        cand = np.flatnonzero(deg < cap) if residual > 0 else np.flatnonzero(deg > 1)
        pick = rng.choice(cand, size=min(abs(residual), cand.shape[0]), replace=False)
        deg[pick] += 1 if residual > 0 else -1
    assert int(deg.sum()) == interactions
    return deg.astype(np.int32)


def _user_prefs(latent: SynthLatent, chunk: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Preferred clusters [n, M] int32 and weights [n, M] float64 of the users of ``chunk``."""
    rng = np.random.default_rng([latent.seed, _S_USERPREF, chunk])
    cdf = np.cumsum(latent.cluster_mass)
    clusters = np.searchsorted(cdf, rng.random((n, M_PREF)) * cdf[-1], side="right")
    clusters = np.minimum(clusters, latent.n_clusters - 1).astype(np.int32)
    weights = rng.gamma(0.5, size=(n, M_PREF)) + 1e-12
    weights /= weights.sum(axis=1, keepdims=True)
    return clusters, weights


def _sampler(latent: SynthLatent):
    """Vectorised draws from P(i | u) for arrays of (preferred clusters, weights) rows."""
    order = np.argsort(latent.item_cluster, kind="stable")  # items grouped by cluster
    cum = np.cumsum(latent.item_weight[order])
    bounds = np.searchsorted(latent.item_cluster[order], np.arange(latent.n_clusters + 1))
    base = np.concatenate(([0.0], cum))[bounds[:-1]]  # mass before each cluster
    mass = latent.cluster_mass
    total = cum[-1]

    def draw(rng: np.random.Generator, clusters: np.ndarray, weights: np.ndarray) -> np.ndarray:
        n = clusters.shape[0]
        r = rng.random(n)
        j = (r > weights[:, 0]).astype(np.int64) + (r > weights[:, 0] + weights[:, 1])
        c = clusters[np.arange(n), np.minimum(j, M_PREF - 1)]
        target = base[c] + rng.random(n) * mass[c]
        glob = rng.random(n) < latent.mu
        target[glob] = rng.random(int(glob.sum())) * total
        by_target = np.argsort(target)  # sorted queries make searchsorted cache-friendly (~10x)
        pos = np.empty(n, dtype=np.int64)
        pos[by_target] = np.searchsorted(cum, target[by_target], side="right")
        hi = np.where(glob, latent.n_items, bounds[c + 1]) - 1
        lo = np.where(glob, 0, bounds[c])
        return order[np.clip(pos, lo, hi)]

    return draw


def _dedupe(rng, owner: np.ndarray, items: np.ndarray, redraw, n_items: int) -> None:
    """Replace repeated (owner, item) pairs in place until every pair is unique: first by redrawing
    from the model, after a few rounds uniformly (heavy users may exhaust their clusters)."""
    keys = owner.astype(np.int64) * n_items + items
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    dup_sorted = np.zeros(keys.shape[0], dtype=bool)
    np.equal(sorted_keys[1:], sorted_keys[:-1], out=dup_sorted[1:])
    pending = np.sort(order[dup_sorted])
    accepted = sorted_keys[~dup_sorted]  # sorted, unique
    extra = np.zeros(0, dtype=np.int64)  # keys accepted in later rounds, sorted
    rounds = 0
    while pending.shape[0]:
        if rounds < 6:
            items[pending] = redraw(pending)
        else:
            items[pending] = rng.integers(0, n_items, size=pending.shape[0])
        rounds += 1
        k = owner[pending].astype(np.int64) * n_items + items[pending]
        bad = np.zeros(k.shape[0], dtype=bool)
        for known in (accepted, extra):
            if known.shape[0]:
                at = np.minimum(np.searchsorted(known, k), known.shape[0] - 1)
                bad |= known[at] == k
        _, first = np.unique(k, return_index=True)
        repeat = np.ones(k.shape[0], dtype=bool)
        repeat[first] = False
        bad |= repeat
        extra = np.sort(np.concatenate((extra, k[~bad])))
        pending = pending[bad]


class _NpyStream:
    """Write a [rows, dim] .npy to any fsspec URL block by block (header first)."""

    def __init__(self, url: str, rows: int, dim: int, dtype: np.dtype):
        self.f = open_url(url, "wb")
        self.dtype = np.dtype(dtype)
        np.lib.format.write_array_header_1_0(
            self.f, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (rows, dim)})

    def write(self, block: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())

    def close(self) -> None:
        self.f.close()


def _write_item_features(out: str, latent: SynthLatent, modalities: dict[str, int], dtype) -> None:
    if not modalities:
        return
    proj = {m: np.random.default_rng([latent.seed, _S_PROJ, k]).standard_normal((LATENT_DIM, d)).astype(np.float32)
            / np.sqrt(LATENT_DIM) for k, (m, d) in enumerate(modalities.items())}
    noise = {m: 0.3 + 0.2 * k for k, m in enumerate(modalities)}  # modalities differ in quality
    streams = {m: _NpyStream(join(out, f"item_{m}.npy"), latent.n_items, d, dtype) for m, d in modalities.items()}
    try:
        for c, lo in enumerate(range(0, latent.n_items, ITEM_CHUNK)):
            hi = min(latent.n_items, lo + ITEM_CHUNK)
            rng = np.random.default_rng([latent.seed, _S_ITEMNOISE, c])
            q = latent.centers[latent.item_cluster[lo:hi]]
            q = q + 0.5 * rng.standard_normal(q.shape, dtype=np.float32)
            for m, d in modalities.items():
                x = q @ proj[m]
                x += noise[m] * rng.standard_normal((hi - lo, d), dtype=np.float32)
                streams[m].write(x)
    finally:
        for s in streams.values():
            s.close()


def generate(out: str, *, users: int, items: int, interactions: int, modalities: dict[str, int] | None = None,
             user_profiles: int = 0, seed: int = 0, feature_dtype: str = "float16") -> dict:
    """Generate a synthetic dataset in goat format at ``out`` (folder or fsspec URL).

    Writes ``train.txt``/``valid.txt``/``test.txt``, ``item_<name>.npy`` [items, dim] per entry of
    ``modalities`` (name -> dim), ``user_profile.npy`` [users, user_profiles] when > 0 (both
    ``feature_dtype``), ``_latent.npz`` (the planted structure, for ``oracle_scores``) and
    ``synth.json`` (arguments and statistics). Returns the statistics.

    Exactly ``interactions`` unique (user, item) pairs; every user has >= 1 train item. Requires
    ``users <= interactions <= users * (items // 2)``."""
    modalities = dict(modalities or {})
    if users < 1 or items < 2:
        raise ValueError(f"synth: need users >= 1 and items >= 2, got {users} users, {items} items")
    cap = max(1, items // 2)
    if not users <= interactions <= users * cap:
        raise ValueError(f"synth: interactions must be in [users, users * items // 2] = [{users}, {users * cap}] "
                         f"(every user gets >= 1 train item, at most half the items), got {interactions}")
    dtype = np.dtype(feature_dtype)
    if dtype not in (np.float16, np.float32):
        raise ValueError(f"synth: feature_dtype must be float16 or float32, got {feature_dtype}")
    t0 = time.perf_counter()
    makedirs(out)

    cluster, weight, centers = _items_side(items, seed)
    mass = np.bincount(cluster, weights=weight, minlength=centers.shape[0])
    chunk_users = int(max(1, min(users, CHUNK_INTERACTIONS * users // interactions)))
    latent = SynthLatent(users, items, seed, chunk_users, MU, cluster, weight, mass, centers)
    with open_url(join(out, LATENT_FILE), "wb") as f:
        np.savez(f, n_users=users, n_items=items, seed=seed, chunk_users=chunk_users, mu=MU,
                 item_cluster=cluster, item_weight=weight, cluster_mass=mass, centers=centers)

    deg = _degrees(users, items, interactions, seed)
    draw = _sampler(latent)
    item_deg = np.zeros(items, dtype=np.int64)
    counts = {"train": 0, "valid": 0, "test": 0}
    files = {s: open_url(join(out, f"{s}.txt"), "wb") for s in counts}
    profile = None
    if user_profiles > 0:
        profile = _NpyStream(join(out, "user_profile.npy"), users, user_profiles, dtype)
        user_proj = (np.random.default_rng([seed, _S_PROJ, 1000]).standard_normal((LATENT_DIM, user_profiles))
                     .astype(np.float32) / np.sqrt(LATENT_DIM))
    n_chunks = (users + chunk_users - 1) // chunk_users
    bar = progress(total=users, desc="synth users", unit="user")
    try:
        for c in range(n_chunks):
            lo, hi = c * chunk_users, min(users, (c + 1) * chunk_users)
            n = hi - lo
            clusters, weights = _user_prefs(latent, c, n)
            d = deg[lo:hi].astype(np.int64)
            rng = np.random.default_rng([seed, _S_DRAWS, c])
            owner = np.repeat(np.arange(n, dtype=np.int64), d)
            chunk_items = draw(rng, clusters[owner], weights[owner])
            _dedupe(rng, owner, chunk_items, lambda idx: draw(rng, clusters[owner[idx]], weights[owner[idx]]), items)
            # split each user's draws (in draw order) 8:1:1 with stochastic rounding, >= 1 train
            srng = np.random.default_rng([seed, _S_SPLIT, c])
            n_valid = np.floor(d * SPLIT_RATIO[1] + srng.random(n)).astype(np.int64)
            n_test = np.floor(d * SPLIT_RATIO[2] + srng.random(n)).astype(np.int64)
            over = np.maximum(n_valid + n_test - (d - 1), 0)
            cut = np.minimum(over, n_valid)
            n_valid -= cut
            n_test -= over - cut
            start = np.concatenate(([0], np.cumsum(d)[:-1]))
            rank = np.arange(owner.shape[0]) - start[owner]
            n_train = d - n_valid - n_test
            split_of = (rank >= n_train[owner]).astype(np.int8) + (rank >= (n_train + n_valid)[owner])
            gusers = owner + lo
            for k, s in enumerate(counts):
                sel = split_of == k
                files[s].write(format_adjacency(gusers[sel], chunk_items[sel]))
                counts[s] += int(sel.sum())
            item_deg += np.bincount(chunk_items[split_of == 0], minlength=items)
            if profile is not None:
                urng = np.random.default_rng([seed, _S_USERNOISE, c])
                p = np.einsum("nm,nmk->nk", weights.astype(np.float32), centers[clusters])
                x = p @ user_proj
                x += 0.3 * urng.standard_normal(x.shape, dtype=np.float32)
                profile.write(x)
            bar.update(n)
    finally:
        bar.close()
        for f in files.values():
            f.close()
        if profile is not None:
            profile.close()
    _write_item_features(out, latent, modalities, dtype)

    stats = {
        "out": str(out), "users": users, "items": items, "interactions": interactions,
        **{f"{s}_interactions": v for s, v in counts.items()},
        "clusters": latent.n_clusters, "user_degree_max": int(deg.max()),
        "user_degree_median": float(np.median(deg)), "train_item_degree_max": int(item_deg.max()),
        "train_item_degree_median": float(np.median(item_deg)),
        "modalities": modalities, "user_profiles": user_profiles, "feature_dtype": str(dtype), "seed": seed,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    with open_url(join(out, "synth.json"), "wb") as f:
        f.write(json.dumps(stats, indent=2).encode())
    log.info("synthetic dataset at %s: %d users, %d items, %d interactions (%.1f s)", out, users, items,
             interactions, stats["seconds"])
    return stats


def load_latent(out: str) -> SynthLatent:
    """The planted structure saved by ``generate`` at ``out``."""
    with open_url(join(out, LATENT_FILE), "rb") as f:
        z = np.load(f)
        return SynthLatent(int(z["n_users"]), int(z["n_items"]), int(z["seed"]), int(z["chunk_users"]),
                           float(z["mu"]), z["item_cluster"], z["item_weight"], z["cluster_mass"], z["centers"])


def oracle_scores(latent: SynthLatent, users: np.ndarray) -> np.ndarray:
    """True generative probabilities P(i | u) for every item: the planted-factor oracle ranking.

    **Shapes:** ``users`` [B] -> [B, n_items] float64 (small B * n_items only)."""
    users = np.asarray(users, dtype=np.int64)
    out = np.empty((users.shape[0], latent.n_items))
    pop = latent.item_weight / latent.item_weight.sum()
    within = latent.item_weight / latent.cluster_mass[latent.item_cluster]  # [I]
    for c in np.unique(users // latent.chunk_users):
        lo = int(c) * latent.chunk_users
        n = min(latent.n_users, lo + latent.chunk_users) - lo
        clusters, weights = _user_prefs(latent, int(c), n)
        sel = np.flatnonzero(users // latent.chunk_users == c)
        local = users[sel] - lo
        pref = np.zeros((sel.shape[0], latent.n_clusters))
        np.add.at(pref, (np.arange(sel.shape[0])[:, None], clusters[local]), weights[local])
        out[sel] = (1 - latent.mu) * pref[:, latent.item_cluster] * within + latent.mu * pop
    return out
