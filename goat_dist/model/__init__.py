"""goat_dist.model"""
