"""Analytic cost model of one distributed RecGOAT training step: bytes per collective, per rank, and
a projected step time on a stated cluster network.

Bytes (what ``parallel/comm_meter.py`` measures, same tags and conventions: ``payload`` = this rank's
input tensor bytes, ``sent`` = bytes to OTHER ranks under the collective's reference algorithm), for
W ranks, per-rank batch B triples, embedding dim d, M item modalities, T = number of InfoNCE terms
(1 user-item + C(M+1, 2) item-view pairs + 1 user-view pair with the user branch), n_dense dense
parameters, and ``U``, ``I`` = user and item ids this rank looks up in the sharded tables (the source
nodes of the outermost user-item block: data-dependent — plug the measured counts, or
:func:`expected_lookups` for an analytic estimate from fanouts and degrees):

    emb_a2a_ids   TorchRec KJT all-to-all (row-wise):  splits 8*3*W + lengths 4*2*S*W + ids 8*(U+I),
                  S = max(U, I, 1) (the KJT stride: both keys padded to it; every rank gets the full
                  lengths); sent = (W-1)/W of splits and lengths + f_remote of the ids
    emb_a2a_out   embedding rows back to the requesters: 4*d*(U+I); sent f_remote of it
    emb_a2a_grad  their gradients to the owners (backward): 4*d*(U+I); sent f_remote of it
    infonce_*     per term: all_gather of both views (2 * 4*d*n) and both id vectors (2 * 8*n), n = the
                  largest per-rank batch (padding), an 8-byte size all-gather, and in backward an
                  all_reduce of each gathered view (2 * 4*d*W*n); all-gather sent = (W-1) payload
    loss_scalars  all_reduce of the batch size (8 B), BPR and L2 (4 B each) and each InfoNCE term (4 B)
    oat_stats     all_reduce of the packed OAT statistics 4*(M d + d + M d^2 + 1) (and again in backward
                  when the W term is trained)
    zero_*        DeepSpeed ZeRO-1/2 as it runs here (0.19.8, overlap_comm off): all_reduce of the
                  flat fp32 gradients 4*n_dense (``reduce="all_reduce"``; ``"reduce_scatter"`` models the
                  NCCL reduce-scatter path), all_gather of the updated partitions 4*ceil(n_dense/W),
                  an all_reduce of the 4-byte global norm (and of a 1-byte overflow flag when
                  DeepSpeed's ``check_grad_overflow`` is on)
    nonfinite_flags  the trainer's all_gather of one uint8 flag per loss part (when it checks them)
    ring all_reduce sent = 2 (W-1)/W payload; f_remote = (W-1)/W unless measured (row-wise blocks,
    ids spread over the id range)

Step-time PROJECTION (:func:`project`): compute time per GPU + the sum of the collectives' times on a
:class:`Network` (default: 8 GPUs per node on NVLink at 450 GB/s per direction per GPU, nodes
linked by 8 x 400 Gb/s NICs = 50 GB/s per GPU; a fraction (W_node-1)/(W-1) of a GPU's peers are on its
node: that share of the sent bytes goes over NVLink, the rest over the NICs; each collective also pays
a latency ``alpha * ceil(log2 W)``); collectives are not overlapped with compute (the code does
not overlap them). Compute is NOT modelled from first principles: the caller gives the measured
per-rank compute time and an assumed speed-up of the target GPU over the measuring CPU (see
``benchmarks/bench_comm.py``); the InfoNCE logits, whose cost grows with W, are added as
FLOPs / an assumed GPU FLOP rate. Every number from ``project`` is a projection, not a measurement.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

TAGS = ("emb_a2a_ids", "emb_a2a_out", "emb_a2a_grad", "infonce_allgather", "infonce_sizes",
        "infonce_allgather_grad", "loss_scalars", "oat_stats", "oat_stats_grad", "zero_grad_reduce",
        "zero_param_allgather", "zero_grad_norm", "zero_overflow_check", "nonfinite_flags")


@dataclass(frozen=True, slots=True)
class StepShape:
    """What one rank's step looks like (see the module docstring for the symbols)."""

    world_size: int
    batch: int                   # B: triples on this rank
    dim: int                     # d
    n_modalities: int            # M
    user_branch: bool
    n_dense: int                 # dense parameters under DeepSpeed
    user_ids: float              # U: user ids looked up (outermost user-item block source users)
    item_ids: float              # I
    cmcl: bool = True            # InfoNCE terms on (loss.cmcl_weight > 0)
    w_term: bool = False         # the OAT W term is trained (ot.w_weight > 0): stats all-reduce in backward
    oat_fusion: bool = True      # model.fusion == "oat" (the statistics all-reduce exists)
    nonfinite_parts: int = 0     # loss parts whose non-finite flags (uint8) the trainer all-gathers (0 = no check)
    zero_overflow_check: bool = False  # DeepSpeed's 1-byte overflow all-reduce (optimizer.check_grad_overflow)
    zero_stage: int = 2
    zero_reduce: str = "all_reduce"   # "all_reduce" (DeepSpeed's path here) | "reduce_scatter"
    remote_fraction: float | None = None  # share of looked-up ids owned by other ranks; None = (W-1)/W
    infonce_rows: int | None = None   # rows each rank pads its InfoNCE views to (max per-rank batch); None = batch
    kjt_keys: int = 2
    kjt_split_tensors: int = 3

    @property
    def infonce_terms(self) -> int:
        if not self.cmcl:
            return 0
        views = 1 + self.n_modalities
        return 1 + views * (views - 1) // 2 + (1 if self.user_branch else 0)

    @property
    def f_remote(self) -> float:
        W = self.world_size
        return (W - 1) / W if self.remote_fraction is None else float(self.remote_fraction)


def ring_allreduce_sent(payload: float, W: int) -> float:
    return 2.0 * (W - 1) / W * payload


def predict_bytes(s: StepShape) -> dict[str, dict[str, Any]]:
    """Per tag: ``op``, ``calls``, ``payload_bytes``, ``sent_bytes`` for one step on one rank
    (world size 1: no collectives, an empty dict)."""
    W, d, B = s.world_size, s.dim, s.batch
    if W == 1:
        return {}
    out: dict[str, dict[str, Any]] = {}

    def add(tag: str, op: str, calls: float, payload: float, sent: float) -> None:
        out[tag] = {"op": op, "calls": calls, "payload_bytes": float(payload), "sent_bytes": float(sent)}

    ids = s.user_ids + s.item_ids
    stride = max(s.user_ids, s.item_ids, 1)
    splits = 8 * s.kjt_split_tensors * W
    lengths = 4 * s.kjt_keys * stride * W
    frac_peer = (W - 1) / W
    add("emb_a2a_ids", "all_to_all_single", 3, splits + lengths + 8 * ids,
        frac_peer * (splits + lengths) + s.f_remote * 8 * ids)
    add("emb_a2a_out", "all_to_all_single", 1, 4 * d * ids, s.f_remote * 4 * d * ids)
    add("emb_a2a_grad", "all_to_all_single", 1, 4 * d * ids, s.f_remote * 4 * d * ids)

    T = s.infonce_terms
    if T:
        n = s.infonce_rows or B
        gathered = T * (2 * 4 * d * n + 2 * 8 * n)
        add("infonce_allgather", "all_gather", 4 * T, gathered, (W - 1) * gathered)
        add("infonce_sizes", "all_gather", T, 8 * T, (W - 1) * 8 * T)
        grad = T * 2 * 4 * d * W * n
        add("infonce_allgather_grad", "all_reduce", 2 * T, grad, ring_allreduce_sent(grad, W))
    scalars = 8 + 4 * 2 + 4 * T
    add("loss_scalars", "all_reduce", 3 + T, scalars, ring_allreduce_sent(scalars, W))
    if s.n_modalities and s.oat_fusion:
        M = s.n_modalities
        stats = 4 * (M * d + d + M * d * d + 1)
        add("oat_stats", "all_reduce", 1, stats, ring_allreduce_sent(stats, W))
        if s.w_term:
            add("oat_stats_grad", "all_reduce", 1, stats, ring_allreduce_sent(stats, W))
    if s.nonfinite_parts:
        add("nonfinite_flags", "all_gather", 1, s.nonfinite_parts, (W - 1) * s.nonfinite_parts)
    if s.n_dense:
        g = 4 * s.n_dense
        if s.zero_reduce == "all_reduce":
            add("zero_grad_reduce", "all_reduce", 1, g, ring_allreduce_sent(g, W))
        elif s.zero_reduce == "reduce_scatter":
            add("zero_grad_reduce", "reduce_scatter_tensor", 1, g, (W - 1) / W * g)
        else:
            raise ValueError(f"zero_reduce must be all_reduce or reduce_scatter, got {s.zero_reduce!r}")
        part = 4 * math.ceil(s.n_dense / W)
        add("zero_param_allgather", "all_gather_into_tensor", 1, part, (W - 1) * part)
        add("zero_grad_norm", "all_reduce", 1, 4, ring_allreduce_sent(4, W))
        if s.zero_overflow_check:
            add("zero_overflow_check", "all_reduce", 1, 1, ring_allreduce_sent(1, W))
    return out


def total_bytes(pred: dict[str, dict[str, Any]], key: str = "sent_bytes") -> float:
    return float(sum(v[key] for v in pred.values()))


def remote_fraction(user_ids: torch.Tensor, item_ids: torch.Tensor, n_users: int, n_items: int, world_size: int,
                    rank: int) -> float:
    """Share of the looked-up ids that live on OTHER ranks under TorchRec's row-wise sharding
    (table rows in contiguous blocks of ``ceil(rows / W)``, block r on rank r)."""
    total = user_ids.numel() + item_ids.numel()
    if total == 0:
        return 0.0
    local = 0
    for ids, n in ((user_ids, n_users), (item_ids, n_items)):
        block = -(-int(n) // world_size)
        local += int(((ids // block) == rank).sum())
    return 1.0 - local / total


# ---- expected lookups from fanouts and degrees ---------------------------------------------------

def expected_distinct(probs: torch.Tensor, draws: float) -> float:
    """E[#distinct] of ``draws`` independent draws from the distribution ``probs`` (occupancy):
    ``sum_j 1 - (1 - p_j)^draws``."""
    p = probs.double().clamp(0, 1)
    return float((1.0 - torch.exp(draws * torch.log1p(-p.clamp(max=1 - 1e-15)))).sum())


def expected_lookups(batch: int, fanouts: list[int], user_degree: torch.Tensor, item_degree: torch.Tensor
                     ) -> tuple[float, float]:
    """Analytic estimate of (U, I): user and item ids one rank looks up per step.

    Model: every node set is treated as the distinct nodes of a number of degree-biased draws (an
    interaction drawn uniformly hits a node with probability proportional to its degree). Seeds:
    B users and 2B items (positive and negative; negatives are really uniform, an approximation).
    Each hop re-samples every node collected so far (the blocks' convention): a node of degree k
    adds ``min(f, k)`` draws of the other type, averaged over the degree-biased distribution.
    Hub-heavy degree laws make it approximate; the benchmark reports it against the measured count.
    """
    du, di = user_degree.double(), item_degree.double()
    pu, pi = du / du.sum(), di / di.sum()
    draws_u, draws_i = float(batch), 2.0 * float(batch)
    nu, ni = expected_distinct(pu, draws_u), expected_distinct(pi, draws_i)
    for f in fanouts:
        mu = float((pu * (du if f < 0 else du.clamp(max=f))).sum())   # E_biased[min(f, deg)] of a user
        mi = float((pi * (di if f < 0 else di.clamp(max=f))).sum())
        draws_i += nu * mu
        draws_u += ni * mi
        nu, ni = expected_distinct(pu, draws_u), expected_distinct(pi, draws_i)
    return nu, ni


# ---- step-time projection -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Network:
    """The stated cluster (per GPU, per direction)."""

    gpus_per_node: int = 8
    intra_gbps: float = 450.0        # GB/s NVLink (900 GB/s bidirectional)
    inter_gbps: float = 50.0         # GB/s: 8 x 400 Gb/s NICs per node = 400 GB/s per node
    alpha_intra_s: float = 5e-6
    alpha_inter_s: float = 15e-6

    def collective_s(self, sent_bytes: float, W: int) -> float:
        """Seconds for one collective in which each GPU sends ``sent_bytes`` to peers spread evenly."""
        if W <= 1:
            return 0.0
        local = min(W, self.gpus_per_node)
        f_intra = (local - 1) / (W - 1)
        t = sent_bytes * f_intra / (self.intra_gbps * 1e9) + sent_bytes * (1 - f_intra) / (self.inter_gbps * 1e9)
        alpha = self.alpha_intra_s if W <= self.gpus_per_node else self.alpha_inter_s
        return t + alpha * math.ceil(math.log2(W))


def infonce_flops(s: StepShape) -> float:
    """FLOPs of one rank's InfoNCE logits per step (forward + backward ~ 3x forward; both directions
    when symmetric): T * 2 directions * 2 n (W n) d * 3."""
    n = s.infonce_rows or s.batch
    return float(s.infonce_terms * 2 * 2 * n * (s.world_size * n) * s.dim * 3)


def project(s: StepShape, other_compute_s: float, net: Network = Network(), gpu_flops: float = 20e12
            ) -> dict[str, Any]:
    """PROJECTED step time of shape ``s`` on ``net``: ``other_compute_s`` (everything except the
    InfoNCE logits, per rank, independent of W at a fixed per-rank batch) + InfoNCE FLOPs /
    ``gpu_flops`` + the collectives' times (:meth:`Network.collective_s`, one call per tag's calls,
    latency per call). Returns seconds and bytes (a projection: nothing here is measured)."""
    pred = predict_bytes(s)
    comm = {}
    for tag, v in pred.items():
        calls = max(1, int(round(v["calls"])))
        comm[tag] = net.collective_s(v["sent_bytes"], s.world_size) + (calls - 1) * (
            net.alpha_intra_s if s.world_size <= net.gpus_per_node else net.alpha_inter_s)
    nce = infonce_flops(s) / gpu_flops
    comm_s = sum(comm.values())
    step = other_compute_s + nce + comm_s
    return {"world_size": s.world_size, "projected": True, "step_s": step, "compute_s": other_compute_s + nce,
            "infonce_compute_s": nce, "comm_s": comm_s, "comm_s_by_tag": comm,
            "sent_bytes_per_gpu": total_bytes(pred), "sent_bytes_by_tag": {k: v["sent_bytes"] for k, v in pred.items()},
            "triples_per_s_global": s.world_size * s.batch / step if step > 0 else float("nan"),
            "network": asdict(net), "gpu_flops": gpu_flops}


def shape_at(s: StepShape, world_size: int) -> StepShape:
    """The same per-rank step at another world size (per-rank batch and lookups fixed; the remote
    fraction goes back to its uniform default)."""
    return replace(s, world_size=world_size, remote_fraction=None)


__all__ = ["StepShape", "Network", "predict_bytes", "total_bytes", "expected_lookups", "expected_distinct",
           "project", "shape_at", "infonce_flops", "ring_allreduce_sent", "remote_fraction", "TAGS"]
