"""goat_dist.losses"""
