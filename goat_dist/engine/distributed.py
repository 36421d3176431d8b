"""DistributedTrainer: the Trainer on W data-parallel ranks, rank-invariant by construction.

Placement (``parallel/``): ID tables sharded by TorchRec (fused optimiser in backward), dense
parameters under a DeepSpeed engine (ZeRO 1/2, clipping). The loop, logging, model selection and
run directory are the single-process ``Trainer``'s; this class overrides what placement changes:
``build``, ``train_step``, ``evaluate`` and model-state snapshots.

Why W ranks with per-rank batch b train exactly like one process with batch W*b:
- Data: the triple sampler runs in ``shard="global_batch"`` mode: step k's global batch (triples,
  order and negatives) is the single-process batch k, and rank r takes its contiguous slice.
- Init: the model is initialised exactly as the single-process trainer does (``materialize_`` with
  the same seed, on the CPU), except that the ID tables stay on ``meta``: their initial values are
  generated in row chunks (the same values and RNG stream as one ``normal_`` per table) and each rank
  keeps only its shards' rows (``LocalTableInit``), copied into the shards TorchRec builds. No rank
  ever holds a full table; the unsharded (meta) tables are dropped with their optimiser hooks
  (``release_in_backward_optimizers``: torch's in-backward optimiser registry would keep them alive).
- Loss: ``compute_loss`` follows the "shares" convention (global value, local-share gradient;
  InfoNCE negatives all-gathered; OAT statistics all-reduced with an autograd all-reduce, so every
  rank solves the same transport problem). Summing gradients over ranks gives the single-process
  gradient. DeepSpeed AVERAGES dense gradients, so the loss is multiplied by W. The table gradients
  reach their owners through TorchRec's all-to-all, whose backward ALSO averages (TorchRec's
  ``comm_ops`` gradient division, on by default, to mimic DDP): the same factor W makes them sums.
  (Were the division off, a forward hook would divide the lookups' gradients by W.) Adagrad-type
  optimisers barely see a gradient scale, so the SGD equivalence test is the one that checks this.
- Optimisers: the fused table optimiser is the single-process one's fbgemm twin (exact row-wise
  Adagrad, Adagrad, SGD); the dense optimiser is the same torch optimiser under ZeRO.
- Dropout masks cannot match across world sizes (per-rank RNG streams): equivalence holds with
  dropout 0; with dropout the runs are statistically, not numerically, equivalent.

Checkpoints (``engine/checkpointing.py``): the tables and TorchRec's fused optimiser state are saved
as ``ShardedTensor`` (DCP reshards them into any world size or sharding type), the dense parameters
and their optimiser moments as FULL fp32 tensors assembled from the ZeRO partitions
(``deepspeed.utils.safe_get_full_*``) and written back into the partitions of any world size with
``safe_set_full_*``; RNG states under ``rng/rank{r}``.

Non-finite guard: the loss parts' finiteness flags are all-gathered BEFORE backward (TorchRec's
fused optimiser updates the tables inside backward, so this is the last point where skipping leaves
every weight unchanged): a non-finite part on any rank skips the step on every rank, naming the rank
and the part. Non-finite DENSE gradients are caught by DeepSpeed's overflow check (switched on here;
all-reduced over ranks) before its optimiser step; the tables' fused update of that step has already
happened by then (not covered: a finite loss with non-finite table gradients).

Evaluation: the representations are computed row-sharded (``RowShard``): rank r computes its row
block of every LightGCN layer (users and items; each layer all-gathered), of the modality encoders
and the fusion (the fused item table all-gathered) and of the user branch, for the eval users only;
the ID lookups go through the sharded tables' all-to-all, the same number of times on every rank.
Each eval batch of the single-process batching is scored by the rank owning its first user (rows
straddling a block boundary are sent to it), and the per-batch metric sums are gathered and
accumulated in the single-process order, so the metrics are bit-identical to single-process
evaluation of the same parameters (every dense op sees the same row chunks as on one process).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from goat_dist.config import Config
from goat_dist.engine import checkpointing as ckpt
from goat_dist.engine.trainer import Trainer
from goat_dist.eval.sharded import process_group_shard, sharded_metrics
from goat_dist.log import get_logger
from goat_dist.model.embeddings import materialize_
from goat_dist.model.lightgcn import RowShard
from goat_dist.model.recgoat import RecGOAT
from goat_dist.parallel.dense import dense_engine
from goat_dist.parallel.process_group import DistEnv, init_process_group
from goat_dist.parallel.sharding import LocalTableInit, gather_tables, plan_tables, shard_tables

log = get_logger(__name__)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


class DistributedTrainer(Trainer):
    """``Trainer`` over the default process group (world size 1 included).

    Args:
        cfg: the full config (``dist`` section: backend, sharding, zero_stage, bf16).
        run_dir: run directory (written by rank 0).
        env: the process group (default: ``parallel.init_process_group(cfg.dist)``).
    """

    def __init__(self, cfg: Config, run_dir: str | Path, env: DistEnv | None = None):
        self.env = env or init_process_group(cfg.dist)
        super().__init__(cfg, run_dir, rank=self.env.rank, world_size=self.env.world_size, device=self.env.device)
        self.engine = None
        self._loss_scale = 1.0

    # ------------------------------------------------------------------------------------------
    def build(self) -> "DistributedTrainer":
        cfg, W = self.cfg, self.world_size
        torch.manual_seed(cfg.train.seed + self.rank)  # per-rank streams (dropout); init is seeded separately
        # step k's global batch is the single-process batch k; rank r takes its slice of it
        self._build_inputs(shard="global_batch")
        triples = self.triples

        # Exactly the single-process initialisation, on the CPU, with the tables left on meta: their
        # initial values are generated chunk by chunk and this rank keeps only its shards' rows
        # (LocalTableInit), which go into the shards once TorchRec has built them.
        model = self._meta_model()
        plan = plan_tables(model, cfg.dist.sharding, cfg.train.optimizer, cfg.train.sparse_lr, self.device)
        init = LocalTableInit(plan, self.rank)
        materialize_(model, "cpu", seed=cfg.train.seed, table_sink=init.sink)
        for name, child in model.named_children():
            if name != "id_emb":
                child.to(self.device)
        for name, p in list(model._parameters.items()):
            if p is not None:
                model._parameters[name] = torch.nn.Parameter(p.detach().to(self.device), p.requires_grad)
        self.dmp = shard_tables(model, cfg.dist.sharding, cfg.train.optimizer, cfg.train.sparse_lr, self.device,
                                plan=plan)
        self.model: RecGOAT = self.dmp.module
        init.copy_into_(self.model)

        table_ids = {id(p) for coll in find_collections_sharded(self.model) for p in coll.parameters()}
        self._dense_named = [(n, p) for n, p in self.model.named_parameters()
                             if id(p) not in table_ids and p.requires_grad]
        dense = [p for p in self.model.parameters() if id(p) not in table_ids]
        self.engine = dense_engine(dense, cfg.train, cfg.dist, self.device, W, self.env.local_rank)
        if self.engine is not None and hasattr(self.engine.optimizer, "check_grad_overflow"):
            # fp32 ZeRO does not look for inf/NaN gradients by default; with the check on, a
            # non-finite dense gradient on any rank skips DeepSpeed's step on every rank.
            self.engine.optimizer.check_grad_overflow = True
        self.sparse_opt = self.dense_opt = None
        # DeepSpeed averages dense gradients over ranks: scale the loss by W to get the SUM the
        # "shares" convention needs. TorchRec's all-to-all backward averages the lookups' gradients
        # too (comm_ops.GRADIENT_DIVISION, on by default), so the same factor is right for the
        # tables; should that global be off, the lookups' gradients are divided by W here.
        self._loss_scale = float(W)
        from torchrec.distributed.comm_ops import get_gradient_division

        if W > 1 and not get_gradient_division():
            self.model.id_emb.register_forward_hook(
                lambda _m, _inp, out: tuple(_ScaleGrad.apply(t, 1.0 / W) for t in out))
        n_dense = sum(p.numel() for p in dense)
        log.info("world size %d: %d dense parameters (DeepSpeed ZeRO-%d); tables %s with fused %s; %d steps/epoch "
                 "of %d triples", W, n_dense, cfg.dist.zero_stage, cfg.dist.sharding, cfg.train.optimizer,
                 self.sampler.num_batches, triples.global_batch_size)
        return self

    def _rank_zero_first(self, fn):
        """Rank 0 runs ``fn`` first (generates a missing dataset, fills the graph cache); the other
        ranks wait at a barrier, then run it (reading what rank 0 wrote)."""
        out = fn() if self.rank == 0 else None
        if self.world_size > 1:
            dist.barrier()
        return out if self.rank == 0 else fn()

    # ------------------------------------------------------------------------------------------
    def train_step(self, batch) -> dict[str, torch.Tensor] | None:
        """One step on this rank's slice of the global batch; returns the global loss parts, or None
        when the step was skipped on every rank (non-finite loss part or dense gradient anywhere)."""
        self.model.train()
        batch = batch.to(self.device)
        W = self.world_size
        buffers = self._snapshot_buffers()
        out = self.model(batch, self.item_features, self.user_features, degrees=self.degrees,
                         reduce_stats=dist_fn.all_reduce if W > 1 else None)
        total, parts = self.model.compute_loss(out, batch, self.cfg.loss, self.rank, W)
        if self._nonfinite("loss", parts):  # before backward: the fused table optimiser runs in it
            self._restore_buffers(buffers)
            return None
        scaled = total * self._loss_scale if self._loss_scale != 1.0 else total
        if self.engine is not None:
            self.engine.backward(scaled)
            self.engine.step()
            if getattr(self.engine.optimizer, "overflow", False):
                self._restore_buffers(buffers)
                self._skip_step("dense gradient", "after the gradient all-reduce: rank unknown; the tables' fused "
                                "update of this step has been applied")
                return None
            if self.cfg.train.grad_clip > 0:
                norm = self.engine.get_global_grad_norm()
                parts["grad_norm"] = torch.as_tensor(float(norm) if norm is not None else 0.0)
        else:
            scaled.backward()
        return parts

    def _nonfinite_flags(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """[world_size, len(values)] bool: every rank's flags (one all-gather)."""
        local = super()._nonfinite_flags(values).to(torch.uint8)
        if self.world_size == 1:
            return local.bool()
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local)
        return torch.cat(out).bool()

    # ---- checkpoints -----------------------------------------------------------------------------
    def _checkpoint_layout(self) -> dict:
        shapes = ckpt.fused_shapes(ckpt.fused_state(self.dmp))
        if self.world_size > 1:  # table-wise / column-wise: a rank holds the state of its tables only
            every: list = [None] * self.world_size
            dist.all_gather_object(every, shapes)
            shapes = {k: v for d in every for k, v in d.items()}
        return {"trainer": type(self).__name__, "world_size": self.world_size, "sharding": self.cfg.dist.sharding,
                "sparse_opt": shapes,
                "dense_keys": ckpt.dense_state_keys(self.engine) if self.engine is not None else []}

    def _training_state(self, layout: dict | None = None) -> dict:
        """The checkpoint state dict (see ``Trainer._training_state``); tables and fused optimiser
        state sharded, dense state full, RNG under this rank's key."""
        import copy

        model = self.model.state_dict()
        fused = ckpt.fused_state(self.dmp)
        if self.engine is not None:
            ckpt.ensure_dense_state(self.engine)
        sd = {"model": model, **self._plain_state()}
        if layout is None:  # save
            sd["best_model"] = self._best_model_state if self._best_model_state is not None else model
            sd["optim"] = {"sparse": fused}
            if self.engine is not None:
                sd["optim"]["dense"] = ckpt.get_dense_state(self.engine, self._dense_named)
            sd[f"rng/rank{self.rank}"] = ckpt.rng_state()
            return sd
        # load: fresh targets where the live tensors are not the place to load into
        sd["best_model"] = copy.deepcopy(model)
        saved_shapes, sparse, self._rowwise_convert = layout.get("sparse_opt", {}), {}, {}
        for pk, states in fused.items():
            sparse[pk] = {}
            for sk, st in states.items():
                shape = saved_shapes.get(f"{pk}/{sk}")
                if shape is None:
                    raise ValueError(f"the checkpoint has no fused optimiser state {pk}/{sk} (train.optimizer "
                                     "changed?)")
                if list(st.size()) == list(shape):
                    sparse[pk][sk] = st
                else:  # row-wise state of another column-shard count: read in full, convert after the load
                    sparse[pk][sk] = torch.empty(shape, dtype=torch.float32)
                    self._rowwise_convert[(pk, sk)] = (st, int(model[pk].size(0)))
        sd["optim"] = {"sparse": sparse}
        if self.engine is not None:
            sd["optim"]["dense"] = ckpt.dense_state_target(self._dense_named, layout.get("dense_keys", []))
        if self.rank < int(layout.get("world_size", 1)):
            sd[f"rng/rank{self.rank}"] = ckpt.rng_state()
        return sd

    def _find_checkpoint(self, spec: str) -> tuple[str | None, dict | None]:
        """Rank 0 finds (and, for "latest", fully verifies) the checkpoint; every rank gets its answer
        (or its error)."""
        answer: list = [None]
        if self.rank == 0:
            try:
                answer[0] = ("ok", super()._find_checkpoint(spec))
            except Exception as exc:  # re-raised on every rank below, so no rank waits forever
                answer[0] = ("error", exc)
        if self.world_size > 1:
            dist.broadcast_object_list(answer, src=0)
        kind, value = answer[0]
        if kind == "error":
            raise value
        return value

    def _apply_loaded(self, sd: dict, layout: dict) -> None:
        for (pk, sk), (target, rows) in self._rowwise_convert.items():
            saved = sd["optim"]["sparse"][pk][sk]
            ckpt.write_rowwise_canonical(target, saved, rows)
            if self.rank == 0:
                log.warning("fused optimiser state %s/%s: saved for %d column shard(s), this plan has %d: seeded "
                            "with the per-row mean of the saved accumulators (row-wise Adagrad has no exact "
                            "mapping between column-shard counts)", pk, sk, saved.numel() // rows,
                            target.size(0) // rows)
        if self.engine is not None:
            ckpt.set_dense_state(self.engine, self._dense_named, sd["optim"]["dense"])
        saved_w = int(layout.get("world_size", self.world_size))
        if saved_w != self.world_size:
            if self.rank == 0:
                log.warning("checkpoint written by %d rank(s), resumed on %d: ranks >= %d start fresh RNG streams",
                            saved_w, self.world_size, saved_w)
            if self.rank >= saved_w:
                ckpt.seed_fresh_rng(self.cfg.train.seed + 7919 * (self.rank + 1) + self.state.step)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float] | None:
        """Full-ranking metrics of ``split``, bit-identical to single-process ``Trainer.evaluate``.

        The representations are computed row-sharded (``_sharded_representations``); users are
        scored by the rank owning them (``eval.sharded.sharded_metrics``)."""
        heldout = self._split_csr(split)
        if heldout is None:
            return None
        users = self._eval_users().to(torch.int64)
        users = users[heldout.degrees()[users] > 0]
        user_reps, item_reps, shard = self._sharded_representations(users)
        return sharded_metrics(user_reps, users, item_reps, heldout, [self._train_csr], list(self.cfg.eval.ks),
                               self.cfg.eval.batch_size, shard, self.dataset.n_users, self.eval_chunk_size)

    eval_chunk_size = 65536  # rows per chunk of the full-graph pass (the single-process trainer's default)

    def _sharded_representations(self, users: torch.Tensor):
        """(representations of the ``users`` in this rank's user block, full item table, the shard):
        every rank computes its row blocks of the LightGCN layers, encoders, fusion and user branch."""
        shard = process_group_shard() if self.world_size > 1 else RowShard()
        if self.cfg.eval.release_mapped_pages:
            self.release_mapped_pages()
        stream = bool(self.cfg.eval.stream_users) and users.numel() < self.dataset.n_users
        if stream and self.world_size > 1:
            self._warn_once("eval.stream_users is ignored at world size %d (the layer buffers are row-sharded)",
                            self.world_size)
            stream = False
        # DeepSpeed keeps the dense parameters as views into flat buffers, at offsets that are not
        # 64-byte aligned; MKL's GEMM result depends on the operands' alignment (seen: 2e-7 apart
        # for the same values), so the pass runs on freshly allocated copies, like one process's.
        table_ids = {id(p) for coll in find_collections_sharded(self.model) for p in coll.parameters()}
        dense = [p for p in self.model.parameters() if id(p) not in table_ids]
        saved = [p.data for p in dense]
        try:
            for p in dense:
                p.data = p.data.clone()
            user_reps, item_reps = self.model.compute_all_representations(
                self.graphs.ui.user_items, self.graphs.ui.item_users, self.item_features, self.user_features,
                self.graphs.item_item, self.graphs.user_user, chunk_size=self.eval_chunk_size, user_ids=users,
                shard=shard, stream_users=stream)
        finally:
            for p, data in zip(dense, saved):
                p.data = data
        return user_reps, item_reps, shard

    # ------------------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state with FULL tables (CPU tensors, the keys of an unsharded RecGOAT) on
        every rank: loadable into a single-process model. Collective (all ranks must call)."""
        tables = gather_tables(self.model)
        out = {}
        for k, v in self.model.state_dict().items():
            out[k] = tables[k] if k in tables else v.detach().cpu().clone()
        return out


def find_collections_sharded(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every (sharded or plain) embedding collection module inside ``model``."""
    from torchrec import EmbeddingCollection
    from torchrec.distributed.embedding import ShardedEmbeddingCollection

    return [m for m in model.modules() if isinstance(m, (EmbeddingCollection, ShardedEmbeddingCollection))]
