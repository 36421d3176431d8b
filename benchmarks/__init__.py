"""goat_dist benchmarks: each module has ``main(argv) -> int`` and is reachable as ``goat bench NAME``."""
