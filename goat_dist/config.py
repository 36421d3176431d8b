"""Typed configuration: one dataclass per section, loaded from YAML, overridden with ``--set``.

Design choices:
- Sections are ``@dataclass(kw_only=True, slots=True)``; a config is a value passed explicitly,
  never a module-level singleton.
- Every YAML key must exist in its section: an unknown key or a wrong type is a ``ConfigError`` that
  names the key and the file (or ``--set``) it came from.
- A string key (or list of strings) with a fixed set of values declares them (``choices`` in the
  field's metadata); any other value is a ``ConfigError`` at load time, even where the key is unused
  by the rest of the config.
- ``--set section.key=value`` parses ``value`` as YAML (``4``, ``0.1``, ``[10, 5]``, ``true``,
  ``{user_item: [10, 5]}``) and type-checks it like a file value.
- The resolved config (defaults + file + overrides) is written to every run directory.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and its source."""


MODALITY_BPR_VIEWS = ("raw", "aligned")
KNN_ID_COMBINE = ("last", "mean")
CMCL_TERMS = ("user_item", "item_views", "user_views")


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    """A string field restricted to ``choices`` (checked by ``_build``)."""
    return field(default=default, metadata={"choices": choices})


@dataclass(kw_only=True, slots=True)
class SynthConfig:
    """Parameters of the built-in synthetic dataset (``goat data synth``)."""

    users: int = 2000
    items: int = 1000
    interactions: int = 40000
    modalities: dict[str, int] = field(default_factory=lambda: {"image": 64, "text": 48})
    user_profiles: int = 32
    seed: int = 0


@dataclass(kw_only=True, slots=True)
class DataConfig:
    path: str = "data/synthetic"
    """Dataset folder or fsspec URL (goat format, an MMRec ``.inter`` file, or a user/item/split table)."""
    format: str = "auto"
    """``auto`` | ``goat`` (train/valid/test.txt) | ``inter`` (MMRec TSV) | ``table`` (parquet/CSV)."""
    inter_file: str = ""
    """For ``format: inter``/``table``: file name inside ``path`` (or a URL); empty = discover."""
    item_features: dict[str, str] = field(default_factory=dict)
    """modality name -> path/URL of an [n_items, dim] matrix; empty = discover ``item_<name>.npy``."""
    user_features: dict[str, str] = field(default_factory=dict)
    """name -> path/URL of an [n_users, dim] matrix; empty = discover ``user_<name>.npy``."""
    feature_norm: str = "none"
    """Normalise every item and user feature matrix once at load (a float32 copy in memory, rows x
    dim x 4 bytes, instead of the memory map): ``none`` | ``standardize`` (per column: minus the mean,
    over the standard deviation) | ``center_l2`` (columns centred, rows unit-norm). The kNN graphs are
    built from the normalised matrices too. See ``data.features.normalize_features``."""
    generate_if_missing: bool = False
    """When ``path`` does not exist, generate the synthetic dataset described by ``synth`` there."""
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass(kw_only=True, slots=True)
class GraphConfig:
    item_knn_k: int = 10
    user_knn_k: int = 10
    knn_block_size: int = 8192
    cache_dir: str = ".cache/goat_graphs"
    device: str = "auto"
    """Where the ``exact`` kNN runs: ``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    knn_backend: str = "auto"
    """``exact`` (blockwise torch GEMM + top-k; the reference) | ``faiss_flat`` (exact, faiss
    IndexFlatIP) | ``ivf`` (approximate, faiss IndexIVF) | ``auto`` (exact up to
    ``knn_exact_max_rows`` rows, ivf above)."""
    knn_exact_max_rows: int = 100_000
    knn_nlist: int = 0
    """ivf: inverted lists (0 = round(4 sqrt(N)))."""
    knn_nprobe: int = 8
    """ivf: lists scanned per query (more = better recall, slower)."""
    knn_ivf_train_per_list: int = 32
    """ivf: k-means training rows per list (a seeded sample of ``train_per_list * nlist`` rows)."""
    knn_ivf_niter: int = 10
    knn_ivf_quantizer: str = "flat"
    """ivf coarse quantiser: ``flat`` (exact assignment) | ``hnsw`` (for tens of millions of rows)."""
    knn_ivf_codec: str = "Flat"
    """ivf storage: ``Flat`` (float32) | ``SQfp16`` (half the memory)."""
    knn_threads: int = 1
    """faiss OpenMP threads (0 = faiss's default: every core)."""


@dataclass(kw_only=True, slots=True)
class SamplingConfig:
    fanouts: Any = -1
    """Per hop list (``[10, 5]``), per relation mapping (``{user_item: [10, 5], item_item: [5]}``),
    or ``-1`` for all neighbours everywhere."""
    num_workers: int = 0
    prefetch_factor: int = 2
    backend: str = "torch"
    """``torch`` (ours, vectorised) or ``pyg_lib`` (when installed)."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    dim: int = 64
    id_layers: int = 3
    """LightGCN layers over the user-item graph."""
    use_item_modalities: bool = True
    modalities: list[str] = field(default_factory=list)
    """Which item modalities to use; empty = every one the dataset has."""
    use_user_branch: bool = True
    gat_layers: int = 1
    gat_heads: int = 1
    fusion: str = "oat"
    """``oat`` | ``concat`` | ``sum`` | ``none`` (ID only)."""
    fusion_normalize: bool = False
    """Apply the paper's normalize(dropout(LayerNorm(.))) to the fused item. Off by default: unit-norm
    items lose the popularity carried by LightGCN item norms (measured: about a third of Recall@20 on
    MovieLens-100K and TikTok in the first epochs)."""
    alpha_init: float = 0.1
    dropout: float = 0.1
    oat_ema_momentum: float = 0.1
    """Momentum of the moving average of OAT statistics; eval-time plans are solved from it."""
    item_knn_id_layers: int = 0
    """Item-item propagation of the raw item ID embeddings (FREEDOM-style, Zhou et al. 2023): the ID
    view of an item gains ``item_knn_id_weight * mean_m (S_m^L e)_i`` over the used modalities' kNN
    graphs, ``S_m = D^-1/2 A_m D^-1/2`` (binary kNN edges incl. self-loops, full-graph degrees), L =
    this many layers (0 = off). Needs item modalities; the kNN graphs of ``item_knn_id_modalities``
    are sampled with ``max(gat_layers, item_knn_id_layers)`` hops, the others with ``gat_layers``."""
    item_knn_id_weight: float = 1.0
    """Weight of the item-item ID propagation term (``item_knn_id_layers``)."""
    item_knn_id_combine: str = _choice("last", KNN_ID_COMBINE)
    """How the item-item ID propagation combines its hops: ``last`` = ``S_m^L e`` (the last hop, as
    FREEDOM), ``mean`` = ``1/L sum_{l=1..L} S_m^l e`` (the mean of hops 1..L, as LightGCN's layer
    mean: the near neighbours keep their weight as L grows)."""
    item_knn_id_modalities: list[str] = field(default_factory=list)
    """The modalities whose kNN graphs carry the item-item ID propagation (a subset of the used
    modalities; empty = all of them). The others keep their GAT views and their place in the fusion."""
    score_fused: bool = True
    """Score with the fused item (True, the paper) or with the ID item only (False, the FREEDOM
    protocol): the modality views and the fusion then act through the loss only
    (``loss.modality_bpr_weight``, ``loss.cmcl_weight``), and serving needs no features."""
    score_view_weight: float = 0.0
    """With ``score_fused: false``: the item that SCORES (evaluation, export) is
    ``id_i + score_view_weight * sum_m view_m(i)``, the views being OAT's aligned views
    (``x_m (T_m + Delta_m)``, fusion ``oat``) or the encoders' raw outputs (other fusions): a late
    fusion of the ID scorer with the modality scorers that ``loss.modality_bpr_weight`` trains. Training
    is unchanged (its BPR ranks with the ID item). 0 = off; must be >= 0."""


@dataclass(kw_only=True, slots=True)
class OTConfig:
    eps: float = 0.05
    max_iter: int = 200
    tol: float = 1e-6
    cost_scale: float = 1.0
    backend: str = "auto"
    """``auto`` (Triton on CUDA; on CPU the compiled numba loop for kernels up to 256 x 256, the
    torch stabilised solver above) | ``torch`` | ``torch_log`` | ``numba`` | ``triton``."""
    w_weight: float = 0.0
    """Weight of the transport cost W = <T, C> as a loss term (0 = logged only)."""


@dataclass(kw_only=True, slots=True)
class LossConfig:
    l2: float = 1e-4
    cmcl_weight: float = 0.1
    cmcl_terms: list[str] = field(default_factory=lambda: list(CMCL_TERMS), metadata={"choices": CMCL_TERMS})
    """Which InfoNCE terms CMCL averages: ``user_item`` (user vs positive item), ``item_views`` (every
    pair of item views: ID and each modality, over the positive items), ``user_views`` (user ID vs
    preference view, user branch only). Default: all three."""
    temperature: float = 0.2
    infonce_symmetric: bool = True
    """InfoNCE in both directions (a->b and b->a, averaged) or a->b only."""
    infonce_local_loss: bool = True
    """Distributed InfoNCE: local rows against global columns (True) or every rank computes all rows."""
    infonce_chunk_size: int = 0
    """Rows per chunk of the InfoNCE log-sum-exp (0 = no chunking)."""
    modality_bpr_weight: float = 0.0
    """Weight of the per-modality BPR terms (FREEDOM-style): for every item modality m,
    BPR(LightGCN user, view_m(item+), view_m(item-)) -- the modality views must rank the user's items
    on their own. 0 = off."""
    modality_bpr_views: str = _choice("raw", MODALITY_BPR_VIEWS)
    """Which views the modality BPR ranks with: ``raw`` (the encoders' outputs) or ``aligned``
    (OAT's transported views ``x_m (T_m + Delta_m)``, in the ID view's coordinates; fusion ``oat``)."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    seed: int = 0
    batch_size: int = 1024
    """Triples per rank per step."""
    max_steps: int = 0
    """Stop after this many steps (0 = unlimited, i.e. ``epochs`` decides)."""
    epochs: int = 1
    optimizer: str = "rowwise_adagrad"
    """Sparse (ID table) optimiser: ``sgd`` | ``adagrad`` | ``rowwise_adagrad`` | ``adam`` (CUDA)."""
    sparse_lr: float = 0.05
    dense_optimizer: str = "adam"
    dense_lr: float = 1e-3
    grad_clip: float = 0.0
    eval_every_epochs: int = 1
    patience: int = 10
    """Early stopping: evaluations without improvement on the validation metric."""
    max_nonfinite_steps: int = 5
    """The run fails when this many steps had a non-finite loss part or dense gradient norm (each such
    step is skipped on every rank, weights unchanged; see ``engine/trainer.py``). 0 or 1: the first."""
    num_threads: int = 0
    """torch intra-op threads of the training process (0 = leave torch's default). On a small, shared
    CPU machine 1 is often several times faster than 2: thread hand-offs stall on busy cores."""


@dataclass(kw_only=True, slots=True)
class DistConfig:
    backend: str = "auto"
    """``auto`` (nccl on CUDA, gloo otherwise) | ``gloo`` | ``nccl``."""
    sharding: str = "row_wise"
    """TorchRec sharding type of the ID tables: ``row_wise`` | ``table_wise`` | ``column_wise``."""
    zero_stage: int = 2
    bf16: bool = False


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [10, 20, 50])
    metric: str = "recall@20"
    """Validation metric used for model selection and early stopping."""
    batch_size: int = 1024
    user_sample: int = 0
    """Evaluate on this many sampled users (0 = all)."""
    stream_users: bool = False
    """With ``user_sample`` in one process: the full-graph LightGCN streams the users through every
    layer instead of holding an [n_users, d] layer buffer (n_users * d * 4 bytes less peak memory, e.g.
    5 GB at 20M users; equal up to float rounding). Ignored (logged) at world size > 1, where the
    buffers are row-sharded anyway."""
    release_mapped_pages: bool = False
    """Before the evaluation's full-graph pass, unmap the pages of the memory-mapped dataset and graph
    cache files that training touched (``goat_dist.data.pages``: madvise; they fault back in from the
    page cache when touched again). Lowers peak RSS by that file-backed part (9.3 GiB at 200M
    interactions); the next training epoch pays the page faults."""


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    dir: str = ""
    """Checkpoint root (path or URL); empty = ``<run_dir>/checkpoints``."""
    every_steps: int = 0
    """Save the full training state every this many steps (0 = no periodic checkpoints)."""
    at_end: bool = True
    """Save the full training state when training ends (before the test evaluation)."""
    keep: int = 3
    """Newest complete checkpoints kept (0 = all)."""


@dataclass(kw_only=True, slots=True)
class LogConfig:
    every_steps: int = 50
    level: str = "INFO"
    tensorboard: bool = True


@dataclass(kw_only=True, slots=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ot: OTConfig = field(default_factory=OTConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


# --------------------------------------------------------------------------------------------------
# Type checking of plain YAML values against dataclass field types.

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_FLOAT_LITERAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``where``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping (section {tp.__name__}), got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, key_tp, f"{where} key"): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)   # YAML 1.1 reads "3e-3" (no dot in the mantissa) as a string
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")  # pragma: no cover


def _build(cls: type, values: dict, where: str) -> Any:
    """``where`` is the dotted key path of this section ("" at the top level)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"{path}: unknown key ({f'section {where!r}' if where else 'the top level'} "
                              f"accepts: {', '.join(sorted(fields))})")
        kwargs[key] = _coerce(value, hints[key], path)
        choices = fields[key].metadata.get("choices")
        if choices is not None:
            many = isinstance(kwargs[key], list)
            bad = [v for v in (kwargs[key] if many else [kwargs[key]]) if v not in choices]
            if bad:
                raise ConfigError(f"{path}: expected {'values among' if many else 'one of'} {', '.join(choices)}, "
                                  f"got {bad[0]!r}")
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (or any section)."""
    return {f.name: (to_dict(v) if dataclasses.is_dataclass(v := getattr(cfg, f.name)) else v)
            for f in dataclasses.fields(cfg)}


def from_dict(values: dict, source: str = "<dict>") -> Config:
    """Build and type-check a Config from nested plain values; ``source`` names them in errors."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        return _build(Config, values, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.1"`` -> (["train", "lr"], 0.1); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: the key must be section.key (e.g. train.batch_size=512)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {exc}") from None
    return parts, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file at ``path`` (if any) <- ``--set`` overrides, type-checked at each stage."""
    values: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        from_dict(values, source)  # errors here name the file, before overrides muddy the source
    for text in overrides:
        parts, value = parse_override(text)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        values = _merge(values, nested)
        try:
            from_dict(values, f"--set {text}")
        except ConfigError as exc:
            raise ConfigError(str(exc)) from None
    return from_dict(values, source)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with ``load_config``)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
