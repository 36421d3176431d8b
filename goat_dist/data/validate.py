"""``goat data validate DIR``: check a dataset and report its statistics.

``validate_dataset(path)`` reads the dataset the way training would (``loader.check_dataset``),
collecting every defect it can reach (one per file at most: a file's first bad line stops that file)
instead of stopping at the first, then computes the statistics of ``stats.dataset_stats``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from goat_dist.config import DataConfig
from goat_dist.data.loader import check_dataset
from goat_dist.data.stats import dataset_stats


@dataclass
class ValidationReport:
    """Outcome of ``validate_dataset``: ``ok`` is False when ``errors`` (``FILE:LINE: ...`` strings)
    is non-empty; ``stats`` holds users, items, interactions per split, duplicates, cold users/items,
    degrees and features (shape, dtype)."""

    path: str
    errors: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        """Human-readable report (what ``goat data validate`` prints)."""
        s = self.stats
        lines = [f"dataset: {self.path}"]
        if s:
            lines.append(f"source: {s['source']}")
            lines.append(f"users: {s['users']:,}")
            lines.append(f"items: {s['items']:,}")
            inter = s["interactions"]
            lines.append("interactions: " + " / ".join(f"{k} {v:,}" for k, v in inter.items())
                         + f" (total {sum(inter.values()):,})")
            lines.append("duplicates: " + " / ".join(f"{k} {v:,}" for k, v in s["duplicates"].items()))
            lines.append(f"cold users (no train, some valid/test): {s['cold_users']:,}")
            lines.append(f"cold items (no train, some valid/test): {s['cold_items']:,}")
            lines.append(f"users without any interaction: {s['users_without_interactions']:,}")
            lines.append(f"items without any interaction: {s['items_without_interactions']:,}")
            for side in ("user", "item"):
                d = s[f"train_{side}_degree"]
                lines.append(f"train {side} degree: min {d['min']} / median {d['median']:g} / mean {d['mean']:g} "
                             f"/ max {d['max']}")
            lines.append(f"train density: {s['density']:.3g}")
            for side in ("item", "user"):
                feats = s[f"{side}_features"]
                if not feats:
                    lines.append(f"{side} features: none")
                for name, f in feats.items():
                    lines.append(f"{side} features '{name}': shape {tuple(f['shape'])} {f['dtype']}"
                                 + (" (memory-mapped)" if f["mmap"] else ""))
        if self.errors:
            lines.append(f"ERRORS ({len(self.errors)}):")
            lines.extend(f"  {e}" for e in self.errors)
        else:
            lines.append("OK: no defects found")
        return "\n".join(lines)


def validate_dataset(path: str, cfg: DataConfig | None = None) -> ValidationReport:
    """Check the dataset at ``path`` (folder, file or URL); ``cfg`` supplies the other data options
    (feature paths, format), its ``path`` is replaced. Never raises for bad data: defects land in
    ``report.errors``."""
    cfg = DataConfig(path=str(path)) if cfg is None else _with_path(cfg, str(path))
    ds, errors = check_dataset(cfg)
    report = ValidationReport(path=str(path), errors=[str(e) for e in errors])
    if ds is not None:
        report.stats = dataset_stats(ds)
    return report


def _with_path(cfg: DataConfig, path: str) -> DataConfig:
    import dataclasses

    return dataclasses.replace(cfg, path=path)
