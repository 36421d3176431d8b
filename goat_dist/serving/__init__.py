"""goat_dist.serving: read a serving bundle written by ``goat export`` and recommend from it.

``Retriever.load(url)`` verifies the bundle (sha256 of every file, its manifest's own digest, tensor
shapes) and offers exact / FAISS top-K retrieval in the dataset's original ids and cold-start item
embedding from modality features. The bundle format is documented in ``bundle.py``.
"""
from goat_dist.serving.bundle import BundleError
from goat_dist.serving.retriever import Retriever

__all__ = ["BundleError", "Retriever"]
