"""goat_dist.engine"""
