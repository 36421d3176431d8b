"""goat_dist.data"""
