"""goat_dist.sampling"""
