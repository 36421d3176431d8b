"""Launch entry points over the one training engine: torchrun (``goat_dist.train``, see torchrun.md) and
Ray Train (``launch/ray_job.py``, see ray.md)."""
