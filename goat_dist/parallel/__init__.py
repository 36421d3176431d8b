"""goat_dist.parallel"""
