"""goat_dist.graph"""
