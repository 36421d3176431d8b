"""What a training checkpoint holds, in a form that does not depend on the world size, and how it
goes back into a trainer.

A checkpoint is one ``CheckpointStore.save`` of a nested state dict (DCP; see
``goat_dist/checkpoint/store.py`` for atomicity, verification and resharding) plus a JSON ``extra``:

| key | single-process ``Trainer`` | ``DistributedTrainer`` |
|---|---|---|
| ``model`` | plain state dict | tables as ``ShardedTensor`` (any sharding reloads into any other), dense parameters and buffers (replicated) |
| ``best_model`` | the valid-selected snapshot (the current model while there is none) | same, sharded like ``model`` |
| ``optim`` | the torch optimisers' state dicts | ``sparse``: TorchRec's fused optimiser state (``ShardedTensor``); ``dense``: the FULL fp32 master parameters and optimiser moments of every dense parameter (``deepspeed.utils.safe_get_full_*``) and Adam's step count, so ZeRO partitions of any world size rebuild from them |
| ``trainer`` | step, epoch, best metric/epoch, early-stopping and non-finite counters, last valid metrics | same |
| ``loader`` | epoch, batches handed out in the epoch, global batch size | same |
| ``rng/rank{r}`` | torch, numpy and python ``random`` states of rank r | one key per rank |

``extra`` = ``{"config": resolved config, "layout": {...}, "metrics": {...}}``; ``layout`` (world
size, sharding, the shapes of the fused optimiser states) is read BEFORE loading so the state dict
to load into matches what was saved (a different world size has fewer or more ``rng/rank{r}``
keys; a different number of column shards changes the shape of row-wise Adagrad's state).

Resharding notes: tables, dense state, buffers and per-coordinate optimiser state reshard exactly.
Row-wise Adagrad keeps ONE accumulator per row per column shard (TorchRec stores
``[rows * column_shards]``); between plans with different column-shard counts (row_wise/table_wise
<-> column_wise, or column_wise at another world size) no exact mapping exists: the per-row mean of
the saved shards' accumulators seeds every new shard (logged as a warning).
"""
from __future__ import annotations

import json
import random
from typing import Any, Mapping

import numpy as np
import torch

from goat_dist.config import Config, to_dict
from goat_dist.log import get_logger

log = get_logger(__name__)

ALLOWED_RESUME_CHANGES: tuple[str, ...] = (
    "train.epochs", "train.max_steps", "train.max_nonfinite_steps", "train.num_threads", "checkpoint.", "log.",
    "dist.", "sampling.num_workers", "sampling.prefetch_factor", "graph.cache_dir", "graph.device",
    "graph.knn_block_size", "graph.knn_threads", "eval.batch_size",
)
"""Config keys (exact, or prefixes ending in ``.``) that may differ between a checkpoint and the run
resuming from it: run length, placement (``dist.*``: world size and sharding change nothing but
where the state lives), performance and bookkeeping. Anything else changes the maths."""


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _allowed(key: str) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in ALLOWED_RESUME_CHANGES)


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key: saved -> current"`` for every config key that differs and may not (see
    :data:`ALLOWED_RESUME_CHANGES`); empty when the run may resume. Values compare as JSON (a
    checkpoint's config went through JSON). A key the checkpoint lacks (written before the key
    existed) compares as its default: at the default it changes nothing."""
    a, b = _flatten(saved), _flatten(json.loads(json.dumps(current)))
    defaults = _flatten(json.loads(json.dumps(to_dict(Config()))))
    out = []
    for key in sorted(set(a) | set(b)):
        if _allowed(key):
            continue
        va, vb = a.get(key, defaults.get(key, "<absent>")), b.get(key, "<absent>")
        if va != vb:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out


# --------------------------------------------------------------------------------------------------
# RNG states (per rank): plain tensors and numbers only, so a weights-only load reads them.

def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and python ``random`` states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    out = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
           "python_internal": torch.tensor(internal, dtype=torch.int64),
           "scalars": json.dumps({"numpy": [str(kind), int(pos), int(has_gauss), float(gauss)],
                                  "python": [int(version), None if py_gauss is None else float(py_gauss)]})}
    if torch.cuda.is_available():
        out["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"].to(torch.uint8))
    scalars = json.loads(state["scalars"])
    kind, pos, has_gauss, gauss = scalars["numpy"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss),
                         float(gauss)))
    version, py_gauss = scalars["python"]
    random.setstate((int(version), tuple(int(x) for x in state["python_internal"].tolist()), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def seed_fresh_rng(seed: int) -> None:
    """Deterministic fresh streams for a rank that has no saved RNG state (a larger world size)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    random.seed(seed)


# --------------------------------------------------------------------------------------------------
# Optimiser state helpers.

@torch.no_grad()
def init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Create a torch optimiser's lazily created state (Adam's moments, ...) with one step of lr 0
    on zero gradients, so that a checkpoint can be loaded INTO it. Parameters do not move (lr 0);
    the step counters this advances are overwritten by the load."""
    if opt.state:
        return
    lrs, fake = [], []
    for group in opt.param_groups:
        lrs.append(group["lr"])
        group["lr"] = 0.0
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
                fake.append(p)
    try:
        opt.step()
    finally:
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
        for p in fake:
            p.grad = None


def _is_zero(opt: Any) -> bool:
    return hasattr(opt, "single_partition_of_fp32_groups") and hasattr(opt, "optimizer")


def _inner(opt: Any) -> torch.optim.Optimizer:
    return opt.optimizer if _is_zero(opt) else opt


def ensure_dense_state(engine) -> None:
    """Make the DeepSpeed engine's optimiser state exist and be linked to the parameters' ZeRO
    fragments (DeepSpeed creates both at the first real step)."""
    opt = engine.optimizer
    inner = _inner(opt)
    if not inner.state:
        if _is_zero(opt):
            for flat in opt.single_partition_of_fp32_groups:
                flat.grad = torch.zeros_like(flat)
        init_optimizer_state(inner)
        if _is_zero(opt):
            for flat in opt.single_partition_of_fp32_groups:
                flat.grad = None
    if _is_zero(opt) and not getattr(opt, "_hp_optimizer_states_linked", True):
        opt._lazy_init_hp_params_optimizer_state()


def dense_state_keys(engine) -> list[str]:
    """Names of the per-parameter optimiser tensors (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``)."""
    inner = _inner(engine.optimizer)
    first = next(iter(inner.state.values()), {})
    return sorted(k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0)


def get_dense_state(engine, named: list[tuple[str, torch.nn.Parameter]]) -> dict[str, Any]:
    """FULL (unpartitioned) fp32 master parameters and optimiser moments of every dense parameter,
    identical on every rank, plus the optimiser step count. COLLECTIVE under ZeRO (one all-reduce
    per parameter and state key)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    ensure_dense_state(engine)
    opt = engine.optimizer
    zero = _is_zero(opt)
    keys = dense_state_keys(engine)
    master, moments = {}, {}
    for name, p in named:
        if zero:
            master[name] = safe_get_full_fp32_param(p).detach().cpu().clone()
            moments[name] = {k: safe_get_full_optimizer_state(p, k).detach().cpu().clone() for k in keys}
        else:
            st = opt.state.get(p, {})
            master[name] = p.detach().float().cpu().clone()
            moments[name] = {k: st[k].detach().cpu().clone() for k in keys}
    steps = [float(s["step"]) for s in _inner(opt).state.values() if "step" in s]
    # plain values as one string / one tensor: DCP may flatten dicts of plain values differently per rank
    return {"master": master, "moments": moments, "keys": json.dumps(keys),
            "step": torch.tensor(max(steps) if steps else 0.0, dtype=torch.float64),
            "engine": torch.tensor([int(engine.global_steps), int(engine.global_samples), int(engine.skipped_steps)])}


@torch.no_grad()
def set_dense_state(engine, named: list[tuple[str, torch.nn.Parameter]], state: Mapping[str, Any]) -> None:
    """Inverse of :func:`get_dense_state` for an engine of ANY world size / ZeRO stage: every rank
    writes its ZeRO fragments from the full tensors, and the model's parameters from the masters."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    ensure_dense_state(engine)
    opt = engine.optimizer
    zero = _is_zero(opt)
    keys = dense_state_keys(engine)
    saved_keys = sorted(json.loads(state["keys"]))
    if saved_keys != keys:
        raise ValueError(f"dense optimiser state keys {saved_keys} in the checkpoint, {keys} in this "
                         "run's optimiser (train.dense_optimizer changed?)")
    for name, p in named:
        value = state["master"][name]
        p.data.copy_(value.to(p.device, p.dtype))
        if zero:
            safe_set_full_fp32_param(p, value.to(p.device))
            for k in keys:
                safe_set_full_optimizer_state(p, state["moments"][name][k].to(p.device), k)
        else:
            st = opt.state.setdefault(p, {})
            for k in keys:
                st[k].copy_(state["moments"][name][k].to(st[k].device))
    for s in _inner(opt).state.values():
        if "step" in s:
            if torch.is_tensor(s["step"]):
                s["step"].fill_(float(state["step"]))
            else:
                s["step"] = int(state["step"])
    for k, v in zip(("global_steps", "global_samples", "skipped_steps"), state["engine"].tolist()):
        setattr(engine, k, int(v))


def dense_state_target(named: list[tuple[str, torch.nn.Parameter]], keys: list[str]) -> dict[str, Any]:
    """Empty tensors shaped like :func:`get_dense_state`'s output, to load a checkpoint into."""
    return {"master": {n: torch.empty(p.shape, dtype=torch.float32) for n, p in named},
            "moments": {n: {k: torch.empty(p.shape, dtype=torch.float32) for k in keys} for n, p in named},
            "keys": json.dumps(list(keys)), "step": torch.zeros((), dtype=torch.float64),
            "engine": torch.zeros(3, dtype=torch.int64)}


# --------------------------------------------------------------------------------------------------
# Fused (TorchRec) optimiser state.

def fused_state(dmp) -> dict[str, dict[str, Any]]:
    """TorchRec's fused optimiser state: ``{param key: {state key: ShardedTensor}}`` (views of the
    live state: loading into them in place restores the optimiser)."""
    return dmp.fused_optimizer.state_dict()["state"]


def fused_shapes(state: Mapping[str, Mapping[str, Any]]) -> dict[str, list[int]]:
    return {f"{pk}/{sk}": list(v.size()) for pk, d in state.items() for sk, v in d.items() if hasattr(v, "size")}


@torch.no_grad()
def write_rowwise_canonical(target, saved_full: torch.Tensor, rows: int) -> None:
    """Write a saved row-wise accumulator of ``k_saved`` column shards (``[rows * k_saved]``, shard j
    at ``[j*rows, (j+1)*rows)``) into ``target`` (a ShardedTensor of ``[rows * k_new]``): the per-row
    mean over the saved shards seeds every new column shard."""
    per_row = saved_full.view(-1, rows).mean(0)
    for shard in target.local_shards():
        (off,), (n,) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        idx = torch.arange(off, off + n) % rows
        shard.tensor.copy_(per_row[idx].to(shard.tensor.device, shard.tensor.dtype))


def read_extra(url: str) -> dict:
    """The ``extra.json`` of checkpoint ``url`` (JSON only: safe to parse before the store's full
    verification, which the load that follows performs)."""
    import fsspec

    from goat_dist.checkpoint.urls import join_url

    with fsspec.open(join_url(url, "extra.json"), "rb") as f:
        return json.loads(f.read().decode("utf-8"))
