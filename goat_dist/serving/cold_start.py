"""Embedding NEW items from their modality features alone (no interactions, no graph neighbourhood).

A cold item is the model's item computation for a node that is isolated in every graph:

    h_m     = x_m W_p^T + b_p                                    (modality projection, feature_dim -> d)
    h_m     <- h_m W_l^T + b_l, ELU between layers               (each GAT layer: with only its self-loop,
                                                                  attention is 1 and GATConv reduces to
                                                                  its linear map averaged over heads)
    a_m     = h_m (T_m + Delta_m)                                (OAT alignment into the ID space, the
                                                                  plan solved from the training EMA)
    x_id^   = sum_m w_m a_m / sum_m w_m                          (the ID view it lacks, imputed from
                                                                  the aligned modality views)
    item    = out(w_0 x_id^ + sum_m w_m a_m)                     (``OATFusion.fuse``; out = identity,
                                                                  or normalize(LayerNorm(.)))

Without normalisation the result simplifies to x_id^ itself. It lives on the scale of the aligned
modality views, which need not be the trained items' (on the synthetic data its norm is ~3.7x a
trained item's, so new items crowd the top of a mixed catalogue; with x_id = 0 it shrinks by sum_m w_m
and they never surface). The export therefore also records ``calibration_scale`` s = <E, I> / <E, E>,
the least-squares fit of the existing items' cold embeddings E onto their trained rows I;
``Retriever.embed_items(..., calibrated=True)`` returns s * item. Measured trade-offs:
``benchmarks/results/cold_start.json``.

Parameters live in ``cold_start.safetensors`` under ``<modality>/proj.weight``, ``<modality>/proj.bias``,
``<modality>/gat<l>.weight`` (heads averaged), ``<modality>/gat<l>.bias``, ``<modality>/align`` and
``fusion/weights`` (+ ``fusion/ln.weight``, ``fusion/ln.bias`` when normalised); their description
(modalities, feature widths, layers, normalisation) is the manifest's ``cold_start`` entry.

**Shapes:** features {m: [n, f_m]} -> [n, d].
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from goat_dist.serving.bundle import BundleError

NO_PARAMS = ("this export has no cold-start parameters (they need OAT fusion over item modalities, "
             "scoring with the fused item: model.score_fused true)")


META_KEYS = ("modalities", "dim", "feature_dims", "gat_layers", "normalize", "ln_eps", "calibration_scale")


def check_meta(meta: Any, where: str) -> None:
    """Raise BundleError naming ``where`` unless ``meta`` describes cold-start parameters."""
    if not isinstance(meta, dict):
        raise BundleError(f"{where}: cold_start must be an object, got {type(meta).__name__}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise BundleError(f"{where}: cold_start is missing {missing}")
    if not isinstance(meta["modalities"], list) or not meta["modalities"] or \
            set(meta["feature_dims"]) != set(meta["modalities"]):
        raise BundleError(f"{where}: cold_start.modalities / feature_dims disagree or are empty")
    scale = meta["calibration_scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale):
        raise BundleError(f"{where}: cold_start.calibration_scale must be a finite number, got {scale!r}")


def expected_tensors(meta: Mapping[str, Any]) -> dict[str, tuple[tuple[int | None, ...], tuple[str, ...]]]:
    """Key -> (shape, dtypes) of every tensor the cold-start file must hold, from its description."""
    d, f32 = int(meta["dim"]), ("float32",)
    out: dict[str, tuple[tuple[int | None, ...], tuple[str, ...]]] = {}
    for m in meta["modalities"]:
        out[f"{m}/proj.weight"] = ((d, int(meta["feature_dims"][m])), f32)
        out[f"{m}/proj.bias"] = ((d,), f32)
        for layer in range(int(meta["gat_layers"])):
            out[f"{m}/gat{layer}.weight"] = ((d, d), f32)
            out[f"{m}/gat{layer}.bias"] = ((d,), f32)
        out[f"{m}/align"] = ((d, d), f32)
    out["fusion/weights"] = ((len(meta["modalities"]) + 1,), f32)
    if meta["normalize"]:
        out["fusion/ln.weight"] = ((d,), f32)
        out["fusion/ln.bias"] = ((d,), f32)
    return out


def check_features(features: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validated float32 feature matrices, one per modality of the model. Raises ValueError naming the
    modality (and row) that is missing, unknown, mis-shaped or non-finite."""
    modalities = list(meta["modalities"])
    unknown = sorted(set(features) - set(modalities))
    missing = [m for m in modalities if m not in features]
    if unknown or missing:
        raise ValueError(f"embed_items: the model's modalities are {modalities}; "
                         + (f"missing {missing}" if missing else "") + ("; " if unknown and missing else "")
                         + (f"unknown {unknown}" if unknown else ""))
    out, n = {}, None
    for m in modalities:
        x = np.asarray(features[m])
        width = int(meta["feature_dims"][m])
        if x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"embed_items: features[{m!r}] has shape {x.shape}, expected [n, {width}]")
        if n is not None and x.shape[0] != n:
            raise ValueError(f"embed_items: features[{m!r}] has {x.shape[0]} rows, "
                             f"features[{modalities[0]!r}] has {n}")
        n = x.shape[0]
        x = x.astype(np.float32, copy=False)
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise ValueError(f"embed_items: features[{m!r}] row {int(np.flatnonzero(bad)[0])} is not finite")
        out[m] = x
    return out


def _elu(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0))).astype(np.float32, copy=False)


def embed_items(params: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                features: Mapping[str, Any]) -> np.ndarray:
    """Item representations [n, d] (float32) of new items from their features (module docstring)."""
    if not meta:
        raise BundleError(NO_PARAMS)
    feats = check_features(features, meta)
    modalities, layers = list(meta["modalities"]), int(meta["gat_layers"])
    w = params["fusion/weights"].astype(np.float32)
    aligned = []
    for m in modalities:
        h = feats[m] @ params[f"{m}/proj.weight"].T + params[f"{m}/proj.bias"]
        for layer in range(layers):
            h = h @ params[f"{m}/gat{layer}.weight"].T + params[f"{m}/gat{layer}.bias"]
            if layer + 1 < layers:
                h = _elu(h)
        aligned.append(h @ params[f"{m}/align"])
    s = sum(w[k + 1] * a for k, a in enumerate(aligned))
    x_id = s / w[1:].sum()
    z = (w[0] * x_id + s).astype(np.float32)
    if meta["normalize"]:
        mu = z.mean(axis=1, keepdims=True)
        var = ((z - mu) ** 2).mean(axis=1, keepdims=True)
        z = (z - mu) / np.sqrt(var + float(meta["ln_eps"])) * params["fusion/ln.weight"] + params["fusion/ln.bias"]
        z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)  # F.normalize's eps
    return z.astype(np.float32, copy=False)
