"""goat_dist.ot"""
