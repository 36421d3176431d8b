"""TorchRec placement of the ID tables: planner -> sharding plan -> DistributedModelParallel.

Design choices:
- The planner is a pure function from (tables, topology, constraints) to a plan; the constraints
  pin every table to the configured sharding type (``dist.sharding``: ``row_wise`` default,
  ``table_wise``, ``column_wise``) and to the FUSED compute kernel, so the sparse optimiser runs
  inside backward (fbgemm) and no gradient of a whole table ever exists. The plan is agreed over the
  group (``collective_plan``) and logged on rank 0.
- Sparse optimiser: the tables' parameters are tagged with ``_apply_optimizer_in_backward`` before
  sharding; the sharder maps the class to fbgemm's fused optimiser. The classes are the same as the
  single-process reference (``engine/optim.py``): ``torchrec.optim.RowWiseAdagrad``,
  ``torch.optim.Adagrad`` (eps 1e-10), ``torch.optim.SGD``; ``torch.optim.Adam`` only on CUDA
  (fbgemm's CPU kernels have no Adam).
- Only the ``EmbeddingCollection`` is sharded (the dense modules stay plain and are handed to
  DeepSpeed, see ``dense.py``); DMP's own DDP wrapping is off.
- Exact initialisation: ``copy_tables_`` writes the rows of a full (unsharded) table into this
  rank's shards, so a sharded run starts from the very parameters of a single-process run;
  ``gather_tables`` is the inverse (full tables on every rank, for tests and export).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from goat_dist.log import get_logger

log = get_logger(__name__)

SHARDING_TYPES = ("row_wise", "table_wise", "column_wise")


def sparse_optimizer_spec(name: str, lr: float, device: torch.device) -> tuple[type, dict]:
    """(optimizer class, kwargs) of the fused in-backward table optimiser for ``train.optimizer``."""
    if name == "rowwise_adagrad":
        from torchrec.optim import RowWiseAdagrad

        return RowWiseAdagrad, {"lr": lr, "eps": 1e-10}
    if name == "adagrad":
        return torch.optim.Adagrad, {"lr": lr, "eps": 1e-10}
    if name == "sgd":
        return torch.optim.SGD, {"lr": lr}
    if name == "adam":
        if device.type != "cuda":
            raise ValueError("train.optimizer=adam: fbgemm's fused Adam exists on CUDA only; on the CPU use "
                             "rowwise_adagrad, adagrad or sgd")
        return torch.optim.Adam, {"lr": lr}
    raise ValueError(f"train.optimizer: {name!r} is not one of rowwise_adagrad, adagrad, sgd, adam")


def find_collections(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> every (unsharded) ``EmbeddingCollection`` in ``model``."""
    from torchrec import EmbeddingCollection

    return {n: m for n, m in model.named_modules() if isinstance(m, EmbeddingCollection)}


def plan_constraints(model: nn.Module, sharding: str, world_size: int) -> dict:
    """ParameterConstraints per table: the configured sharding type and the fused kernel.

    Column-wise: shards of at least ``dim / world_size`` columns (rounded up to 4), so a table is
    split across ranks instead of landing whole on one."""
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.planner import ParameterConstraints

    if sharding not in SHARDING_TYPES:
        raise ValueError(f"dist.sharding: {sharding!r} is not one of {', '.join(SHARDING_TYPES)}")
    out = {}
    for coll in find_collections(model).values():
        for table in coll.embedding_configs():
            kw = {}
            if sharding == "column_wise":
                part = -(-table.embedding_dim // world_size)
                kw["min_partition"] = max(4, -(-part // 4) * 4)
            out[table.name] = ParameterConstraints(sharding_types=[sharding],
                                                   compute_kernels=[EmbeddingComputeKernel.FUSED.value], **kw)
    return out


def make_plan(model: nn.Module, sharding: str, world_size: int, device: torch.device, sharders: list,
              group=None):
    """The agreed sharding plan of ``model``'s tables (logged on rank 0)."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

    topology = Topology(world_size=world_size, compute_device=device.type,
                        local_world_size=min(world_size, max(1, torch.cuda.device_count()))
                        if device.type == "cuda" else world_size)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=plan_constraints(model, sharding, world_size))
    plan = planner.collective_plan(model, sharders, group or dist.GroupMember.WORLD)
    log.info("TorchRec sharding plan (%s):\n%s", sharding, plan)
    return plan


def plan_tables(model: nn.Module, sharding: str, optimizer: str, lr: float, device: torch.device, group=None):
    """Attach the fused optimiser spec to ``model``'s tables (``_apply_optimizer_in_backward``; the
    tables may still be on ``meta``) and return the agreed sharding plan (collective)."""
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.embedding import EmbeddingCollectionSharder

    cls, kwargs = sparse_optimizer_spec(optimizer, lr, device)
    for coll in find_collections(model).values():
        _apply_optimizer_in_backward(cls, coll.parameters(), kwargs)
    group = group or dist.GroupMember.WORLD
    return make_plan(model, sharding, dist.get_world_size(group), device, [EmbeddingCollectionSharder()], group)


def shard_tables(model: nn.Module, sharding: str, optimizer: str, lr: float, device: torch.device, group=None,
                 plan=None):
    """Wrap ``model`` in ``DistributedModelParallel``: its ``EmbeddingCollection`` sharded per the
    plan with the fused optimiser in backward; every other parameter stays a plain local tensor
    (allocated and reset by DMP if ``model`` was built on ``meta``).

    ``plan``: from ``plan_tables`` on the same model (which then already carries the fused
    optimiser spec); None = plan here.

    Returns the DMP; ``dmp.module`` is ``model`` with the collection replaced by its sharded twin.
    """
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.types import ShardingEnv

    group = group or dist.GroupMember.WORLD
    if plan is None:
        plan = plan_tables(model, sharding, optimizer, lr, device, group)
    sharders = [EmbeddingCollectionSharder()]
    unsharded = [p for coll in find_collections(model).values() for p in coll.parameters()]
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(group), device=device, plan=plan,
                                   sharders=sharders, init_data_parallel=False)
    release_in_backward_optimizers(unsharded)
    return dmp


def release_in_backward_optimizers(params: list[torch.Tensor]) -> None:
    """Undo ``_apply_optimizer_in_backward`` on ``params`` (the unsharded tables, once the sharder has
    read their optimiser spec): remove the hooks and the registry entries, so that the tables can be
    freed. Torch keeps each parameter's AccumulateGrad node in a ``WeakTensorKeyDictionary`` whose
    value references the parameter itself, so without this every full table outlives the sharding
    (seen: +5.6 GB per rank for the 22M x 64 tables of the 200M run)."""
    from torch.distributed.optim import apply_optimizer_in_backward as aob

    for p in params:
        for handle in aob.param_to_optim_hook_handle_map.pop(p, None) or []:
            handle.remove()
        aob.param_to_acc_grad_map.pop(p, None)
        for attr in ("_in_backward_optimizers", "_optimizer_classes", "_optimizer_kwargs"):
            p.__dict__.pop(attr, None)


def _sharded_tables(module: nn.Module) -> dict[str, object]:
    """Qualified parameter name -> ShardedTensor of every sharded table in ``module``."""
    return {k: v for k, v in module.state_dict().items() if hasattr(v, "local_shards")}


class LocalTableInit:
    """This rank's rows of every table, filled chunk by chunk while the model is initialised with the
    tables on ``meta`` (``materialize_(table_sink=init.sink)``), then copied into the shards
    (``init.copy_into_(dmp.module)``): no rank ever holds a full table (at 200M interactions 5.6 GB
    per rank, which two ranks could not hold beside their shards in 24 GB).

    ``plan``: the agreed ``ShardingPlan``; ``rank``: this process's global rank."""

    def __init__(self, plan, rank: int):
        self.parts: dict[str, list[tuple[int, int, int, int, torch.Tensor]]] = {}
        for module_plan in plan.plan.values():
            for table, ps in module_plan.items():
                for sh in ps.sharding_spec.shards:
                    if sh.placement.rank() == rank:
                        (r0, c0), (nr, nc) = sh.shard_offsets, sh.shard_sizes
                        self.parts.setdefault(table, []).append((r0, nr, c0, nc, torch.empty((nr, nc))))
        self.filled: dict[str, int] = {}

    def sink(self, table: str, first_row: int, rows: torch.Tensor) -> None:
        """Keep the rows of ``rows`` (table rows ``first_row ...``) that this rank's shards own."""
        lo, hi = first_row, first_row + rows.shape[0]
        for r0, nr, c0, nc, buf in self.parts.get(table, []):
            a, b = max(lo, r0), min(hi, r0 + nr)
            if a < b:
                buf[a - r0:b - r0] = rows[a - lo:b - lo, c0:c0 + nc]
                self.filled[table] = self.filled.get(table, 0) + (b - a) * nc

    @torch.no_grad()
    def copy_into_(self, module: nn.Module) -> None:
        """Write the kept rows into the local shards of ``module``'s sharded tables; frees them."""
        for table, parts in self.parts.items():
            need = sum(nr * nc for _, nr, _, nc, _ in parts)
            if self.filled.get(table, 0) != need:
                raise RuntimeError(f"table {table}: {self.filled.get(table, 0)} of this rank's {need} initial "
                                   "entries were generated (was the model initialised with this sink?)")
        for name, st in _sharded_tables(module).items():
            table = name.split(".")[-2]  # ...embeddings.<table>.weight
            for shard in st.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                src = next((buf for pr0, pnr, pc0, pnc, buf in self.parts.get(table, [])
                            if (pr0, pc0, pnr, pnc) == (r0, c0, nr, nc)), None)
                if src is None:
                    raise KeyError(f"{name}: no initial rows for the local shard at rows {r0}+{nr}, cols {c0}+{nc}")
                shard.tensor.copy_(src.to(shard.tensor.device, shard.tensor.dtype))
        self.parts.clear()


@torch.no_grad()
def copy_tables_(module: nn.Module, full: Mapping[str, torch.Tensor]) -> None:
    """Write rows/columns of full tables (``{qualified name: [rows, dim]}``, e.g. the state of an
    unsharded model) into this rank's shards. Every sharded table must be in ``full``."""
    for name, st in _sharded_tables(module).items():
        if name not in full:
            raise KeyError(f"no full tensor for sharded table {name}")
        src = full[name]
        if tuple(src.shape) != tuple(st.size()):
            raise ValueError(f"{name}: full tensor {tuple(src.shape)} vs sharded table {tuple(st.size())}")
        for shard in st.local_shards():
            (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.copy_(src[r0:r0 + nr, c0:c0 + nc].to(shard.tensor.device, shard.tensor.dtype))


@torch.no_grad()
def gather_tables(module: nn.Module, group=None) -> dict[str, torch.Tensor]:
    """Full copies (CPU, on every rank) of every sharded table: ``{qualified name: [rows, dim]}``.

    One all-gather of each rank's shards; for tests, checks and export of small tables."""
    group = group or dist.GroupMember.WORLD
    out = {}
    for name, st in _sharded_tables(module).items():
        local = [(tuple(s.metadata.shard_offsets), tuple(s.metadata.shard_sizes), s.tensor.detach().cpu())
                 for s in st.local_shards()]
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, local, group=group)
        full = torch.empty(tuple(st.size()), dtype=torch.float32)
        for shards in gathered:
            for (r0, c0), (nr, nc), t in shards:
                full[r0:r0 + nr, c0:c0 + nc] = t
        out[name] = full
    return out
