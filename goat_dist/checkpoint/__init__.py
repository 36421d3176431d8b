"""goat_dist.checkpoint"""
