"""The Trainer: build everything from a Config, run train steps, evaluate, select on validation.

Reads top to bottom: ``build`` (data -> graphs -> sampler -> model -> optimisers), ``train_step``
(one mini-batch), ``evaluate`` (full ranking of one split), ``fit`` (epochs, logging, model
selection and early stopping on the VALIDATION split, then one test evaluation of the selected
model). The trainer is Stateful (``state_dict``/``load_state_dict``) so that its counters travel
with checkpoints. It contains no model maths: that lives in ``model/``, ``ot/`` and ``losses/``.

Checkpoints (``checkpoint.*``): the whole training state (``engine/checkpointing.py`` lists it) is
saved every ``checkpoint.every_steps`` steps and when training ends, into a ``CheckpointStore`` under
``checkpoint.dir`` (default ``<run_dir>/checkpoints``), keeping the newest ``checkpoint.keep``.
``resume("latest" | URL)`` before ``fit`` continues a run exactly where the checkpoint was taken
(same later losses and parameters as a run never interrupted). ``add_checkpoint_listener(fn)``:
``fn(url, step, metrics)`` after every complete save, on every rank.

Non-finite guard: a step whose loss (any part) is not finite is skipped BEFORE backward, so no
optimiser runs (the OAT moving averages the forward updated are put back); a step whose gradients
are not finite is skipped before the optimisers run. Every rank skips the same steps (the flags are
all-reduced in the distributed trainer). The run fails after ``train.max_nonfinite_steps`` such steps.
"""
from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from goat_dist.config import Config, DataConfig, save_config, to_dict
from goat_dist.data import RecDataset, load_dataset
from goat_dist.data.fsio import exists, join, local_path
from goat_dist.data.pages import release_mapped_pages
from goat_dist.engine import checkpointing as ckpt
from goat_dist.engine.optim import dense_optimizer, sparse_grad_optimizer, sparse_optimizer
from goat_dist.engine.run_logger import RunLogger
from goat_dist.eval.metrics import finalize, metric_sums
from goat_dist.graph import Graphs, build_graphs
from goat_dist.graph.csr import CSR
from goat_dist.log import get_logger, progress
from goat_dist.model.embeddings import materialize_
from goat_dist.model.recgoat import RecGOAT, item_item_hops, knn_id_modalities, used_modalities
from goat_dist.sampling.loader import MiniBatchSampler, make_loader
from goat_dist.sampling.triples import TripleSampler

log = get_logger(__name__)


def prepare_dataset(cfg: DataConfig) -> RecDataset:
    """Load ``cfg.path``; generate the synthetic dataset there first when asked and missing."""
    if cfg.generate_if_missing and not exists(cfg.path):
        from goat_dist.data.synth import generate

        s = cfg.synth
        log.info("data.path %s does not exist: generating the synthetic dataset there", cfg.path)
        generate(cfg.path, users=s.users, items=s.items, interactions=s.interactions,
                 modalities=dict(s.modalities), user_profiles=s.user_profiles, seed=s.seed)
    return load_dataset(cfg)


@dataclass(slots=True)
class TrainState:
    step: int = 0
    epoch: int = 0
    best_metric: float = -float("inf")
    best_epoch: int = -1
    evals_without_improvement: int = 0
    nonfinite_steps: int = 0


class NonFiniteError(RuntimeError):
    """Too many training steps had a non-finite loss or gradient (``train.max_nonfinite_steps``)."""


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.state = TrainState()
        self._logger: RunLogger | None = None  # opened at first use: a resumed run appends to its log
        self._log_events: list[dict] = []
        self._best_model_state: dict[str, torch.Tensor] | None = None
        self._listeners: list[Callable[[str, int, dict], None]] = []
        self._store = None
        self._resume_loader: dict | None = None
        self._last_saved_step = -1
        self._last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------
    def build(self) -> "Trainer":
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        self._build_inputs()
        self.model = self._new_model(self.device)
        sparse = list(self.model.id_emb.parameters())
        sparse_ids = {id(p) for p in sparse}
        dense = [p for p in self.model.parameters() if id(p) not in sparse_ids]
        if sparse_grad_optimizer(cfg.train.optimizer):   # O(batch rows) per step, not O(table)
            for emb in self.model.id_emb.collection.embeddings.values():
                emb.sparse = True
        self.sparse_opt = sparse_optimizer(cfg.train.optimizer, sparse, cfg.train.sparse_lr)
        self.dense_opt = dense_optimizer(cfg.train.dense_optimizer, dense, cfg.train.dense_lr)
        log.info("user branch %s; %d dense parameters; %d batches/epoch",
                 "on" if self.model.use_user_branch else "off", sum(p.numel() for p in dense),
                 self.sampler.num_batches)
        return self

    def _rank_zero_first(self, fn):
        """Run ``fn`` (data generation, graph building: things that fill a shared cache). One process
        here; the distributed trainer runs it on rank 0 first, the other ranks after a barrier."""
        return fn()

    def _build_inputs(self, shard: str = "strided") -> None:
        """Data -> graphs -> triple and neighbour samplers -> loader, plus the feature sources and
        full-graph degrees the model reads. Shared by every trainer; ``shard`` is the
        ``TripleSampler`` sharding of the interactions over ranks."""
        cfg, mcfg = self.cfg, self.cfg.model
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        t0 = time.perf_counter()
        self.dataset = ds = self._rank_zero_first(lambda: prepare_dataset(cfg.data))
        t_data = time.perf_counter()
        self.item_dims = {m: int(f.shape[1]) for m, f in ds.item_features.items()}
        self.modalities = used_modalities(mcfg, self.item_dims)
        self.user_feature_name = sorted(ds.user_features)[0] if (mcfg.use_user_branch and ds.user_features) else None
        self.graphs: Graphs = self._rank_zero_first(lambda: build_graphs(
            ds, cfg.graph, self.modalities, self.user_feature_name is not None, self.user_feature_name))
        t_graph = time.perf_counter()

        ui = self.graphs.ui
        self.triples = TripleSampler(ds.train.users, ds.train.items, ds.n_items, ui.user_items,
                                     cfg.train.batch_size, cfg.train.seed, rank=self.rank,
                                     world_size=self.world_size, shard=shard)
        self.sampler = MiniBatchSampler(
            self.triples, ui.user_items, ui.item_users,
            hops={"user_item": mcfg.id_layers, "item_item": item_item_hops(mcfg, self.modalities),
                  "user_user": mcfg.gat_layers},
            fanouts=cfg.sampling.fanouts, item_item=self.graphs.item_item, user_user=self.graphs.user_user,
            backend=cfg.sampling.backend)
        self.loader = make_loader(self.sampler, num_workers=cfg.sampling.num_workers,
                                  prefetch_factor=cfg.sampling.prefetch_factor)
        # DataLoader draws a worker base seed from the GLOBAL torch RNG at every iter(); a private
        # generator keeps the dropout stream independent of when epochs (or a resumed epoch) start.
        self.loader.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.item_features = {m: ds.item_features[m] for m in self.modalities}
        self.user_features = ds.user_features[self.user_feature_name] if self.user_feature_name else None
        self.degrees = {"user": ui.user_degree.to(self.device), "item": ui.item_degree.to(self.device)}
        # the item-item ID propagation's full-graph kNN degrees
        self.degrees.update({f"knn_{m}": self.graphs.item_item[m].degrees().to(torch.float32).to(self.device)
                             for m in knn_id_modalities(mcfg, self.modalities)})
        self._heldout = {}
        self._train_csr = ui.user_items
        log.info("data %.1fs, graphs %.1fs: %d users, %d items, %d train interactions; modalities %s",
                 t_data - t0, t_graph - t_data, ds.n_users, ds.n_items, len(ds.train), self.modalities or "none")

    def _meta_model(self) -> RecGOAT:
        """The model on ``meta`` (no memory), as every trainer builds it."""
        ds = self.dataset
        return RecGOAT(self.cfg.model, self.cfg.ot, ds.n_users, ds.n_items, self.item_dims,
                       None if self.user_features is None else int(self.user_features.shape[1]), device="meta")

    def _new_model(self, device: torch.device | str) -> RecGOAT:
        """The model built on ``meta`` and materialised on ``device`` with the config's seed (the same
        initial parameters in every trainer and on every rank)."""
        return materialize_(self._meta_model(), device, seed=self.cfg.train.seed)

    # ------------------------------------------------------------------------------------------
    def train_step(self, batch) -> dict[str, torch.Tensor] | None:
        """Forward, loss, backward and optimiser step on one mini-batch; returns the loss parts
        (detached 0-dim tensors), or None when the step was skipped (non-finite loss or gradient:
        parameters, optimiser state and buffers unchanged)."""
        self.model.train()
        batch = batch.to(self.device)
        buffers = self._snapshot_buffers()
        out = self.model(batch, self.item_features, self.user_features, degrees=self.degrees)
        total, parts = self.model.compute_loss(out, batch, self.cfg.loss)
        if self._nonfinite("loss", parts):
            self._restore_buffers(buffers)
            return None
        self.sparse_opt.zero_grad(set_to_none=True)
        if self.dense_opt is not None:
            self.dense_opt.zero_grad(set_to_none=True)
        total.backward()
        for p in self.model.id_emb.parameters():    # row-sparse: duplicates summed once, here
            if p.grad is not None and p.grad.is_sparse:
                p.grad = p.grad.coalesce()
        grads = [p.grad.values() if p.grad.is_sparse else p.grad for p in self.model.parameters() if p.grad is not None]
        gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else None
        if gnorm is not None and self._nonfinite("gradient", {"grad_norm": gnorm}):
            self.sparse_opt.zero_grad(set_to_none=True)
            if self.dense_opt is not None:
                self.dense_opt.zero_grad(set_to_none=True)
            self._restore_buffers(buffers)
            return None
        if self.cfg.train.grad_clip > 0:
            parts["grad_norm"] = (torch.nn.utils.clip_grad_norm_(
                [p for g in (self.dense_opt.param_groups if self.dense_opt else []) for p in g["params"]],
                self.cfg.train.grad_clip))
        self.sparse_opt.step()
        if self.dense_opt is not None:
            self.dense_opt.step()
        return parts

    # ---- non-finite guard ----------------------------------------------------------------------
    def _snapshot_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of the buffers the forward may update (the OAT moving averages)."""
        return [(b, b.detach().clone()) for b in self.model.buffers() if not hasattr(b, "local_shards")]

    @staticmethod
    @torch.no_grad()
    def _restore_buffers(snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for buf, saved in snapshot:
            buf.copy_(saved)

    def _nonfinite_flags(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """[world_size, len(values)] bool: which value is not finite on which rank (one process here;
        the distributed trainer all-gathers)."""
        return torch.stack([~torch.isfinite(v.detach().float()).all() for v in values.values()]).unsqueeze(0)

    def _nonfinite(self, what: str, values: dict[str, torch.Tensor]) -> bool:
        """True when any of ``values`` is not finite on any rank: logs which rank and which part,
        counts the skipped step and raises :class:`NonFiniteError` at ``train.max_nonfinite_steps``."""
        flags = self._nonfinite_flags(values)
        if not bool(flags.any()):
            return False
        names = list(values)
        self._skip_step(what, "; ".join(f"rank {r}: {', '.join(names[j] for j in range(len(names)) if flags[r, j])}"
                                        for r in range(flags.shape[0]) if flags[r].any()))
        return True

    def _warn_once(self, msg: str, *args) -> None:
        """A warning every rank would raise alike: logged once (rank 0), at DEBUG on the others."""
        (log.warning if self.rank == 0 else log.debug)(msg, *args)

    def _skip_step(self, what: str, where: str) -> None:
        """Count and log a skipped step; raise :class:`NonFiniteError` at the limit."""
        st = self.state
        st.nonfinite_steps += 1
        limit = max(1, self.cfg.train.max_nonfinite_steps)
        self._warn_once("step %d: non-finite %s (%s): step skipped on every rank, weights unchanged "
                        "(%d of at most %d)", st.step + 1, what, where, st.nonfinite_steps, limit)
        if st.nonfinite_steps >= limit:
            raise NonFiniteError(f"{st.nonfinite_steps} training steps had a non-finite {what} (last at step "
                                 f"{st.step + 1}: {where}); train.max_nonfinite_steps="
                                 f"{self.cfg.train.max_nonfinite_steps}. Check the inputs for NaN/Inf and lower the "
                                 "learning rates")

    # ------------------------------------------------------------------------------------------
    def _split_csr(self, split: str) -> CSR | None:
        if split not in self._heldout:
            inter = self.dataset.splits.get(split)
            self._heldout[split] = None if inter is None or len(inter) == 0 else CSR.from_edges(
                inter.users, inter.items, self.dataset.n_users, self.dataset.n_items)
        return self._heldout[split]

    def _eval_users(self) -> torch.Tensor:
        n, sample = self.dataset.n_users, self.cfg.eval.user_sample
        if sample and sample < n:
            g = torch.Generator().manual_seed(self.cfg.train.seed + 7919)
            return torch.randperm(n, generator=g)[:sample].sort().values
        return torch.arange(n)

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float] | None:
        """Full-ranking metrics of ``split`` (train items masked; valid items stay candidates at
        test time, as in the published protocol). None when the split is absent or empty."""
        heldout = self._split_csr(split)
        if heldout is None:
            return None
        users = self._eval_users()
        subset = users if users.numel() < self.dataset.n_users else None  # eval.user_sample
        sums = metric_sums(self._scorer(subset), users, heldout, [self._train_csr], list(self.cfg.eval.ks),
                           self.cfg.eval.batch_size)
        return finalize(sums)

    def release_mapped_pages(self) -> dict | None:
        """Unmap the resident pages of the memory-mapped dataset folder, feature files and graph cache
        (``goat_dist.data.pages.release_mapped_pages``; local paths only)."""
        d = self.cfg.data
        files = [join(d.path, f) for f in (*d.item_features.values(), *d.user_features.values())]
        urls = [d.path, *files, self.cfg.graph.cache_dir]
        return release_mapped_pages([p for p in map(local_path, filter(None, urls)) if p])

    def _scorer(self, users: torch.Tensor | None = None):
        """``score(user_ids [b]) -> [b, n_items]`` from representations computed ONCE per evaluation.

        ``users`` (sorted, unique): only these users' final representations are built (the
        ``eval.user_sample`` case: at 20M users the full user table is not materialised); ``score``
        then accepts only ids from ``users``."""
        if self.cfg.eval.release_mapped_pages:
            self.release_mapped_pages()
        user_reps, item_reps = self.model.compute_all_representations(
            self.graphs.ui.user_items, self.graphs.ui.item_users, self.item_features, self.user_features,
            self.graphs.item_item, self.graphs.user_user, user_ids=users,
            stream_users=bool(self.cfg.eval.stream_users and users is not None))
        item_t = item_reps.t().contiguous()
        if users is None:
            return lambda ub: user_reps[ub.to(user_reps.device)] @ item_t
        users = users.to(torch.int64)

        def score(ub: torch.Tensor) -> torch.Tensor:
            ub = ub.to(torch.int64)
            pos = torch.searchsorted(users, ub).clamp_max(users.numel() - 1)
            if not bool((users[pos] == ub).all()):
                raise KeyError(f"scorer built for {users.numel()} sampled users was asked for others")
            return user_reps[pos.to(user_reps.device)] @ item_t
        return score

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        metric = cfg.eval.metric
        has_valid = self._split_csr("valid") is not None
        if not has_valid:
            log.warning("no valid split: model selection falls back to the LAST epoch (no test-set selection)")
        stop = bool(cfg.train.max_steps and st.step >= cfg.train.max_steps)  # resumed at (or past) the end
        t_start = time.perf_counter()
        every = cfg.checkpoint.every_steps
        while st.epoch < cfg.train.epochs and not stop:
            resumed, self._resume_loader = self._resume_loader, None
            if resumed is not None and resumed["epoch"] == st.epoch:
                self.loader.load_state_dict(resumed)  # continue the interrupted epoch at its next batch
            else:
                self.loader.set_epoch(st.epoch)
            bar = progress(self.loader, total=len(self.loader), desc=f"epoch {st.epoch}", unit="batch")
            t_last, n_last = time.perf_counter(), 0
            for batch in bar:
                parts = self.train_step(batch)
                st.step += 1
                n_last += batch.users.numel()
                if parts is None:  # skipped: non-finite loss or gradient (logged by the guard)
                    pass
                elif st.step % cfg.log.every_steps == 0 or (every > 0 and st.step % every == 0):
                    # parts are 0-dim tensors: converting only here keeps the other steps free of syncs
                    parts = {k: float(v) for k, v in parts.items()}
                    dt = time.perf_counter() - t_last
                    rate = n_last / dt if dt > 0 else 0.0
                    self.logger.log("train", st.step, epoch=st.epoch, loss=parts["loss"],
                                    **{f"loss_{k}": v for k, v in parts.items() if k != "loss"},
                                    triples_per_s=rate)
                    bar.set_postfix(loss=f"{parts['loss']:.4f}", tps=f"{rate:,.0f}")
                    t_last, n_last = time.perf_counter(), 0
                    self._last_metrics.update({k if k == "loss" else f"loss_{k}": v for k, v in parts.items()})
                if every > 0 and st.step % every == 0:
                    self.save_checkpoint()
                if cfg.train.max_steps and st.step >= cfg.train.max_steps:
                    stop = True
                    break
            last_epoch = stop or st.epoch + 1 >= cfg.train.epochs
            if (st.epoch + 1) % cfg.train.eval_every_epochs == 0 or last_epoch:
                stop = self._validate() or stop
            st.epoch += 1
        train_seconds = time.perf_counter() - t_start
        if cfg.checkpoint.at_end and st.step != self._last_saved_step:
            self.save_checkpoint()

        if self._best_model_state is not None:
            self.model.load_state_dict(self._best_model_state)
        test = self.evaluate("test")
        final = {"best_epoch": st.best_epoch, "selected_on": "valid" if has_valid else "last epoch (no valid split)",
                 "metric": metric, "valid": self._best_valid, "test": test, "steps": st.step,
                 "epochs_run": st.epoch, "train_seconds": round(train_seconds, 2)}
        if test is not None:
            self.logger.log("test", st.step, epoch=st.best_epoch, **test)
            log.info("test (epoch %d, selected on %s): %s", st.best_epoch, final["selected_on"],
                     ", ".join(f"{k}={test[k]:.4f}" for k in (f"recall@{k}" for k in cfg.eval.ks)))
        self.logger.write_json("final.json", final)
        self.logger.plot(metric)
        return final

    _best_valid: dict[str, float] | None = None

    def _validate(self) -> bool:
        """Evaluate on valid, keep the best model, return True when early stopping triggers."""
        st, metric = self.state, self.cfg.eval.metric
        valid = self.evaluate("valid")
        if valid is None:  # no valid split: the last epoch is the selected one
            st.best_epoch, self._best_valid, self._best_model_state = st.epoch, None, None
            return False
        if metric not in valid:
            raise KeyError(f"eval.metric {metric!r} is not computed (have: {', '.join(sorted(valid))})")
        self.logger.log("valid", st.step, epoch=st.epoch, **valid)
        self._last_metrics.update({f"valid_{k}": v for k, v in valid.items()})
        log.info("epoch %d valid %s=%.4f", st.epoch, metric, valid[metric])
        if valid[metric] > st.best_metric:
            st.best_metric, st.best_epoch, self._best_valid = valid[metric], st.epoch, valid
            st.evals_without_improvement = 0
            self._best_model_state = copy.deepcopy(self.model.state_dict())
        else:
            st.evals_without_improvement += 1
        if st.evals_without_improvement >= self.cfg.train.patience:
            log.info("early stopping: %d evaluations without improvement of valid %s", st.evals_without_improvement,
                     metric)
            return True
        return False

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters, loader position and valid metrics of the best epoch (plain values)."""
        st = self.state
        return {"trainer": dict(step=st.step, epoch=st.epoch, best_metric=st.best_metric, best_epoch=st.best_epoch,
                                evals_without_improvement=st.evals_without_improvement,
                                nonfinite_steps=st.nonfinite_steps,
                                has_best_model=self._best_model_state is not None,
                                best_valid=dict(self._best_valid) if self._best_valid else None),
                "loader": {**self.loader.state_dict(), "global_batch": self._global_batch()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = dict(state["trainer"])
        self._best_valid = t.pop("best_valid", None)
        t.pop("has_best_model", None)
        self.state = TrainState(**t)
        self._resume_loader = self._loader_position(state["loader"])

    def _global_batch(self) -> int:
        """Triples per step over all ranks (what one loader position stands for)."""
        return self.triples.global_batch_size

    def _loader_position(self, saved: dict) -> dict:
        """The loader state to resume from: the saved one, or (global batch size changed with the world
        size) the batch covering the same number of triples of the epoch."""
        gb = self._global_batch()
        saved_gb = int(saved.get("global_batch", gb))
        pos = int(saved["position"])
        if saved_gb != gb:
            pos = (pos * saved_gb) // gb
            self._warn_once("global batch %d in the checkpoint, %d now (world size changed): resuming epoch %d "
                            "at batch %d; the data order from here differs from the original run", saved_gb, gb,
                            int(saved["epoch"]), pos)
        return {"epoch": int(saved["epoch"]), "position": pos}

    # ---- checkpoints ---------------------------------------------------------------------------
    def add_checkpoint_listener(self, fn: Callable[[str, int, dict], None]) -> None:
        """Call ``fn(url, step, metrics)`` on every rank after every complete checkpoint save
        (``metrics``: the latest logged loss parts and valid metrics, floats)."""
        self._listeners.append(fn)

    @property
    def checkpoint_root(self) -> str:
        return self.cfg.checkpoint.dir or str(self.run_dir / "checkpoints")

    @property
    def store(self):
        if self._store is None:
            from goat_dist.checkpoint import CheckpointStore

            self._store = CheckpointStore(self.checkpoint_root, keep=self.cfg.checkpoint.keep)
        return self._store

    def _model_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def _training_state(self, layout: dict | None = None) -> dict[str, Any]:
        """The nested state dict a checkpoint holds (see ``engine/checkpointing.py``). ``layout`` None:
        this trainer's live state, to save; else the layout of a checkpoint to load into (tensors are
        the live ones where loading in place restores them, fresh ones elsewhere)."""
        for opt in (self.sparse_opt, self.dense_opt):
            if opt is not None:
                ckpt.init_optimizer_state(opt)
        model = self._model_state()
        best = self._best_model_state if (layout is None and self._best_model_state is not None) else model
        if layout is not None:
            best = copy.deepcopy(model)
        sd: dict[str, Any] = {
            "model": model, "best_model": best,
            "optim": {"sparse": self.sparse_opt.state_dict(),
                      **({"dense": self.dense_opt.state_dict()} if self.dense_opt is not None else {})},
            **self._plain_state(), f"rng/rank{self.rank}": ckpt.rng_state()}
        return sd

    def _plain_state(self) -> dict[str, str]:
        """``state_dict()``'s sections as JSON strings: DCP flattens a dict of plain values into
        per-key entries on some ranks and keeps it whole on others (seen on gloo, 3 ranks), so
        every rank stores one string per section instead."""
        return {k: json.dumps(v) for k, v in self.state_dict().items()}

    @staticmethod
    def _drop_unsaved_optimizer_state(sd: dict[str, Any], saved: set[str]) -> None:
        """Remove from the load target the per-parameter optimiser states the checkpoint has none of:
        a parameter that never had a gradient (e.g. the fusion weights with ``score_fused: false``)
        has no Adam state in the saving run, and after the load must have none here either. A state
        the checkpoint holds only part of stays in the target, so that the load names what is missing."""
        for name, opt_sd in sd["optim"].items():
            if not (isinstance(opt_sd, dict) and "state" in opt_sd and "param_groups" in opt_sd):
                continue   # not a torch optimiser's state_dict (fused TorchRec / DeepSpeed layouts)
            state = opt_sd["state"]
            for pid in list(state):
                if not any(f"optim.{name}.state.{pid}.{k}" in saved for k in state[pid]):
                    del state[pid]

    def _apply_loaded(self, sd: dict[str, Any], layout: dict) -> None:
        """After an in-place load: what does not live in the tensors the load wrote into."""
        self.sparse_opt.load_state_dict(sd["optim"]["sparse"])
        if self.dense_opt is not None:
            self.dense_opt.load_state_dict(sd["optim"]["dense"])

    def _checkpoint_layout(self) -> dict:
        return {"trainer": type(self).__name__, "world_size": self.world_size}

    def save_checkpoint(self) -> str:
        """Save the whole training state now (collective over all ranks); returns the URL and calls
        the checkpoint listeners."""
        st = self.state
        extra = {"config": to_dict(self.cfg), "layout": self._checkpoint_layout(),
                 "trainer": {"class": type(self).__name__, "step": st.step, "epoch": st.epoch,
                             "best_epoch": st.best_epoch, "has_best_model": self._best_model_state is not None},
                 "metrics": {k: v for k, v in self._last_metrics.items() if math.isfinite(v)}}
        url = self.store.save(st.step, self._training_state(), extra=extra)
        self._last_saved_step = st.step
        for fn in self._listeners:
            fn(url, st.step, dict(extra["metrics"]))
        return url

    def _store_for(self, spec: str):
        """The store to load ``spec`` through: ``checkpoint.dir``'s for "latest", else one rooted at
        the checkpoint's parent directory."""
        if spec == "latest":
            return self.store
        from goat_dist.checkpoint import CheckpointStore

        spec = spec.rstrip("/")
        return CheckpointStore(spec.rsplit("/", 1)[0] if "/" in spec else ".", keep=0)

    def _find_checkpoint(self, spec: str) -> tuple[str | None, dict | None]:
        """(url, extra) of ``spec``; url None when "latest" finds none. (Rank 0's work: the
        distributed trainer broadcasts the answer.)"""
        url = self._store_for(spec).latest() if spec == "latest" else spec.rstrip("/")
        return url, (ckpt.read_extra(url) if url is not None else None)

    def resume(self, spec: str) -> bool:
        """Load the training state of checkpoint ``spec`` (``"latest"``: the newest complete one under
        ``checkpoint.dir``; or a checkpoint URL) before ``fit``. Returns False when ``"latest"``
        finds none. A config that differs from the checkpoint's in anything but
        :data:`~goat_dist.engine.checkpointing.ALLOWED_RESUME_CHANGES` is a ``ConfigError`` naming
        the keys."""
        from goat_dist.checkpoint import CheckpointError
        from goat_dist.config import ConfigError

        try:
            url, extra = self._find_checkpoint(spec)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {spec!r}: cannot read its extra.json: {exc}") from exc
        if url is None:
            log.info("resume latest: no complete checkpoint under %s; starting from scratch", self.checkpoint_root)
            return False
        diff = ckpt.config_differences(extra.get("config", {}), to_dict(self.cfg))
        if diff:
            raise ConfigError(f"cannot resume from {url}: the config differs in {len(diff)} key(s) that change "
                              f"training: {'; '.join(diff)} (only these may change: "
                              f"{', '.join(ckpt.ALLOWED_RESUME_CHANGES)})")
        layout = extra.get("layout", {})
        if layout.get("trainer", type(self).__name__) != type(self).__name__:
            raise CheckpointError(f"checkpoint {url} was written by {layout.get('trainer')}; this is "
                                  f"{type(self).__name__} (resume single-process runs with `goat train`, "
                                  f"distributed ones with --nproc / torchrun)")
        sd = self._training_state(layout)
        store = self._store_for(spec)
        self._drop_unsaved_optimizer_state(sd, store.saved_keys(url))
        store.load(url, sd)
        plain = {k: json.loads(sd[k]) for k in self.state_dict()}
        self.load_state_dict(plain)
        self._best_model_state = sd["best_model"] if plain["trainer"]["has_best_model"] else None
        self._apply_loaded(sd, layout)
        key = f"rng/rank{self.rank}"
        if key in sd:
            ckpt.set_rng_state(sd[key])
        self._last_saved_step = self.state.step
        self._reopen_run_log(self.state.step)
        log.info("resumed from %s: step %d, epoch %d (batch %d of it)", url, self.state.step, self.state.epoch,
                 self._resume_loader["position"] if self._resume_loader else 0)
        return True

    @property
    def logger(self) -> RunLogger:
        """The run directory's logger (rank 0 writes), opened at first use: appending to the kept
        events after a resume, starting ``metrics.jsonl`` afresh otherwise."""
        if self._logger is None:
            self._logger = RunLogger(self.run_dir, enabled=self.rank == 0, tensorboard=self.cfg.log.tensorboard,
                                     append=bool(self._log_events))
            if self._logger.enabled:
                self._logger._events.extend(self._log_events)  # the plots cover the whole run
        return self._logger

    def _reopen_run_log(self, step: int) -> None:
        """Continue ``metrics.jsonl``: keep the events up to the checkpoint's step (later ones are
        logged again by the resumed run), append from there."""
        if self.rank != 0:
            return
        path = self.run_dir / "metrics.jsonl"
        if self._logger is not None:
            self._logger.close()
            self._logger = None
        kept = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the kill
                    continue
                if event.get("step", 0) <= step and event.get("event") != "test":
                    kept.append(event)
            path.write_text("".join(json.dumps(e, default=float) + "\n" for e in kept), encoding="utf-8")
        self._log_events = kept or [{"event": "resume", "step": step}]

    def close(self) -> None:
        if self._logger is not None:
            self._logger.close()


def train_main(cfg: Config, run_dir: str | Path | None = None, resume: str | None = None) -> int:
    """``goat train [--resume latest|URL]``: build, (resume,) fit, say where the results are.
    Returns the exit code."""
    run_dir = Path(run_dir or "runs/default")
    trainer = Trainer(cfg, run_dir).build()
    try:
        if resume:
            trainer.resume(resume)
        final = trainer.fit()
    finally:
        trainer.close()
    log.info("run directory %s: config.yaml, metrics.jsonl, final.json, loss.png, valid.png", run_dir)
    return 0 if final is not None else 1
