"""The Trainer: build everything from a Config, run train steps, evaluate, select on validation.

Reads top to bottom: ``build`` (data -> graphs -> sampler -> model -> optimisers), ``train_step``
(one mini-batch), ``evaluate`` (full ranking of one split), ``fit`` (epochs, logging, model
selection and early stopping on the VALIDATION split, then one test evaluation of the selected
model). The trainer is Stateful (``state_dict``/``load_state_dict``) so that its counters travel
with checkpoints. It contains no model maths: that lives in ``model/``, ``ot/`` and ``losses/``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from goat_dist.config import Config, DataConfig, save_config, to_dict
from goat_dist.data import RecDataset, load_dataset
from goat_dist.data.fsio import exists
from goat_dist.engine.optim import dense_optimizer, sparse_optimizer
from goat_dist.engine.run_logger import RunLogger
from goat_dist.eval.metrics import finalize, metric_sums
from goat_dist.graph import Graphs, build_graphs
from goat_dist.graph.csr import CSR
from goat_dist.log import get_logger, progress
from goat_dist.model.embeddings import materialize_
from goat_dist.model.recgoat import RecGOAT
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


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.state = TrainState()
        self.logger = RunLogger(self.run_dir, enabled=rank == 0, tensorboard=cfg.log.tensorboard)
        self._best_model_state: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------------
    def build(self) -> "Trainer":
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        self._build_inputs()
        self.model = self._new_model(self.device)
        sparse = list(self.model.id_emb.parameters())
        sparse_ids = {id(p) for p in sparse}
        dense = [p for p in self.model.parameters() if id(p) not in sparse_ids]
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
        if cfg.checkpoint.every_steps > 0 or cfg.checkpoint.dir:
            log.warning("checkpoint.every_steps=%d / checkpoint.dir=%r are set, but checkpointing is not built "
                        "yet: this run writes NO checkpoints", cfg.checkpoint.every_steps, cfg.checkpoint.dir)
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        t0 = time.perf_counter()
        self.dataset = ds = self._rank_zero_first(lambda: prepare_dataset(cfg.data))
        t_data = time.perf_counter()
        self.item_dims = {m: int(f.shape[1]) for m, f in ds.item_features.items()}
        self.modalities = (list(mcfg.modalities) or sorted(self.item_dims)) if mcfg.use_item_modalities else []
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
            hops={"user_item": mcfg.id_layers, "item_item": mcfg.gat_layers, "user_user": mcfg.gat_layers},
            fanouts=cfg.sampling.fanouts, item_item=self.graphs.item_item, user_user=self.graphs.user_user,
            backend=cfg.sampling.backend)
        self.loader = make_loader(self.sampler, num_workers=cfg.sampling.num_workers,
                                  prefetch_factor=cfg.sampling.prefetch_factor)
        self.item_features = {m: ds.item_features[m] for m in self.modalities}
        self.user_features = ds.user_features[self.user_feature_name] if self.user_feature_name else None
        self.degrees = {"user": ui.user_degree.to(self.device), "item": ui.item_degree.to(self.device)}
        self._heldout = {}
        self._train_csr = ui.user_items
        log.info("data %.1fs, graphs %.1fs: %d users, %d items, %d train interactions; modalities %s",
                 t_data - t0, t_graph - t_data, ds.n_users, ds.n_items, len(ds.train), self.modalities or "none")

    def _new_model(self, device: torch.device | str) -> RecGOAT:
        """The model built on ``meta`` and materialised on ``device`` with the config's seed (the same
        initial parameters in every trainer and on every rank)."""
        ds = self.dataset
        model = RecGOAT(self.cfg.model, self.cfg.ot, ds.n_users, ds.n_items, self.item_dims,
                        None if self.user_features is None else int(self.user_features.shape[1]), device="meta")
        return materialize_(model, device, seed=self.cfg.train.seed)

    # ------------------------------------------------------------------------------------------
    def train_step(self, batch) -> dict[str, torch.Tensor]:
        """Forward, loss, backward and optimiser step on one mini-batch; returns the loss parts
        (detached 0-dim tensors)."""
        self.model.train()
        batch = batch.to(self.device)
        out = self.model(batch, self.item_features, self.user_features, degrees=self.degrees)
        total, parts = self.model.compute_loss(out, batch, self.cfg.loss)
        self.sparse_opt.zero_grad(set_to_none=True)
        if self.dense_opt is not None:
            self.dense_opt.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.train.grad_clip > 0:
            parts["grad_norm"] = (torch.nn.utils.clip_grad_norm_(
                [p for g in (self.dense_opt.param_groups if self.dense_opt else []) for p in g["params"]],
                self.cfg.train.grad_clip))
        self.sparse_opt.step()
        if self.dense_opt is not None:
            self.dense_opt.step()
        return parts

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
        sums = metric_sums(self._scorer(), self._eval_users(), heldout, [self._train_csr], list(self.cfg.eval.ks),
                           self.cfg.eval.batch_size)
        return finalize(sums)

    def _scorer(self):
        """``score(user_ids [b]) -> [b, n_items]`` from representations computed ONCE per evaluation."""
        user_reps, item_reps = self.model.compute_all_representations(
            self.graphs.ui.user_items, self.graphs.ui.item_users, self.item_features, self.user_features,
            self.graphs.item_item, self.graphs.user_user)
        item_t = item_reps.t().contiguous()
        return lambda ub: user_reps[ub.to(user_reps.device)] @ item_t

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        metric = cfg.eval.metric
        has_valid = self._split_csr("valid") is not None
        if not has_valid:
            log.warning("no valid split: model selection falls back to the LAST epoch (no test-set selection)")
        stop = False
        t_start = time.perf_counter()
        while st.epoch < cfg.train.epochs and not stop:
            self.loader.set_epoch(st.epoch)
            bar = progress(self.loader, total=len(self.loader), desc=f"epoch {st.epoch}", unit="batch")
            t_last, n_last = time.perf_counter(), 0
            for batch in bar:
                parts = self.train_step(batch)
                st.step += 1
                n_last += batch.users.numel()
                if st.step % cfg.log.every_steps == 0:
                    # parts are 0-dim tensors: converting only here keeps the other steps free of syncs
                    parts = {k: float(v) for k, v in parts.items()}
                    dt = time.perf_counter() - t_last
                    rate = n_last / dt if dt > 0 else 0.0
                    self.logger.log("train", st.step, epoch=st.epoch, loss=parts["loss"],
                                    **{f"loss_{k}": v for k, v in parts.items() if k != "loss"},
                                    triples_per_s=rate)
                    bar.set_postfix(loss=f"{parts['loss']:.4f}", tps=f"{rate:,.0f}")
                    t_last, n_last = time.perf_counter(), 0
                if cfg.train.max_steps and st.step >= cfg.train.max_steps:
                    stop = True
                    break
            last_epoch = stop or st.epoch + 1 >= cfg.train.epochs
            if (st.epoch + 1) % cfg.train.eval_every_epochs == 0 or last_epoch:
                stop = self._validate() or stop
            st.epoch += 1
        train_seconds = time.perf_counter() - t_start

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
        return {"trainer": dict(step=self.state.step, epoch=self.state.epoch, best_metric=self.state.best_metric,
                                best_epoch=self.state.best_epoch,
                                evals_without_improvement=self.state.evals_without_improvement),
                "sampler": self.sampler.state_dict(), "config": to_dict(self.cfg)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = TrainState(**state["trainer"])
        self.sampler.load_state_dict(state["sampler"])

    def close(self) -> None:
        self.logger.close()


def train_main(cfg: Config, run_dir: str | Path | None = None) -> int:
    """``goat train``: build, fit, print where the results are. Returns the exit code."""
    run_dir = Path(run_dir or "runs/default")
    trainer = Trainer(cfg, run_dir).build()
    try:
        final = trainer.fit()
    finally:
        trainer.close()
    log.info("run directory %s: config.yaml, metrics.jsonl, final.json, loss.png, valid.png", run_dir)
    return 0 if final is not None else 1
