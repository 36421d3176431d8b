"""goat_dist: distributed training of RecGOAT-style multimodal recommenders.

Dependencies are installed (pinned, in the order that works on CPU machines) by `make install`;
`install_requires` lists only what the package imports unconditionally so that `pip install -e .`
never swaps the pinned torch for another build.
"""
from setuptools import find_packages, setup

setup(
    name="goat_dist",
    version="0.1.0",
    description="Distributed multi-GPU training of RecGOAT-style recommenders",
    packages=find_packages(include=["goat_dist", "goat_dist.*", "launch", "benchmarks"]),
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "PyYAML", "fsspec", "tqdm"],
    entry_points={"console_scripts": ["goat = goat_dist.cli:main"]},
)
