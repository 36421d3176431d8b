"""goat_dist.eval"""
