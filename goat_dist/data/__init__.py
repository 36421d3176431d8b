"""goat_dist.data: read, check and generate recommendation datasets.

Entry points: ``load_dataset(cfg) -> RecDataset`` (format auto-detection, fsspec URLs),
``validate_dataset(path) -> ValidationReport`` and ``synth.generate(...)``. Lower-level readers live in
``adjacency`` (train/valid/test.txt), ``inter`` (MMRec .inter), ``table`` (user,item,split tables) and
``features`` (.npy matrices). Every defect raises ``DataError`` naming file and line (or row).
"""
from goat_dist.data.dataset import SPLITS, Interactions, RecDataset
from goat_dist.data.errors import DataError
from goat_dist.data.loader import check_dataset, detect_format, load_dataset
from goat_dist.data.validate import ValidationReport, validate_dataset

__all__ = ["SPLITS", "Interactions", "RecDataset", "DataError", "load_dataset", "check_dataset", "detect_format",
           "validate_dataset", "ValidationReport"]
