"""goat_dist.parallel: placement only (no model maths).

- ``process_group``: join the launcher's world (torchrun / Ray env vars; world size 1 included),
  nccl on CUDA, gloo otherwise.
- ``sharding``: TorchRec planner -> logged plan -> DistributedModelParallel of the ID tables with the
  fused optimiser in backward; gather/copy of full tables.
- ``dense``: DeepSpeed ZeRO-1/2 engine over every dense parameter (clipping, bf16 on CUDA).
"""
from goat_dist.parallel.process_group import DistEnv, destroy_process_group, init_process_group, resolve_backend

__all__ = ["DistEnv", "init_process_group", "destroy_process_group", "resolve_backend"]
