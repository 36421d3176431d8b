"""DeepSpeed for the dense parameters (GAT encoders, projections, fusion, user beta).

Design choices:
- The engine owns every dense parameter and nothing else: the parameters are collected into a
  small holder module (the SAME ``Parameter`` objects the model uses, so ZeRO's flattening is seen
  by the model) and the model's forward is called directly. The TorchRec tables are outside ZeRO:
  their fused optimiser updates them in backward.
- ZeRO stage 1 or 2 (``dist.zero_stage``), gradient clipping (``train.grad_clip``, on the global
  norm of the reduced dense gradients, as the single-process trainer clips), bf16 only on CUDA.
- The optimiser is the single-process one (``engine/optim.py``: torch Adam/AdamW/SGD) handed to
  DeepSpeed as a client optimiser, so the update rule is the same element by element (ZeRO only
  partitions the flat fp32 buffers).
- DeepSpeed AVERAGES gradients over the data-parallel ranks. The loss convention of
  ``RecGOAT.compute_loss`` ("shares") wants a SUM, so the trainer multiplies the loss by the world
  size (TorchRec's all-to-all backward averages the table gradients as well, so one factor fits
  both; see ``engine/distributed.py``).
"""
from __future__ import annotations

import os
from typing import Iterable

import torch
from torch import nn

from goat_dist.config import DistConfig, TrainConfig
from goat_dist.engine.optim import dense_optimizer
from goat_dist.log import get_logger

log = get_logger(__name__)


class DenseParameters(nn.Module):
    """Holder of the dense parameters handed to DeepSpeed (shared with the model, not copies)."""

    def __init__(self, params: Iterable[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(list(params))

    def forward(self, *args, **kwargs):  # pragma: no cover - the model is called directly
        raise RuntimeError("DenseParameters only holds parameters for DeepSpeed; call the model")


def deepspeed_config(train: TrainConfig, dist_cfg: DistConfig, device: torch.device, world_size: int) -> dict:
    """The DeepSpeed config dict for the dense parameters."""
    if dist_cfg.zero_stage not in (0, 1, 2):
        raise ValueError(f"dist.zero_stage must be 0, 1 or 2 (3 would shard the parameters the model reads "
                         f"directly), got {dist_cfg.zero_stage}")
    cfg = {
        "train_micro_batch_size_per_gpu": int(train.batch_size),
        "gradient_accumulation_steps": 1,
        "train_batch_size": int(train.batch_size) * world_size,
        "zero_optimization": {"stage": int(dist_cfg.zero_stage), "overlap_comm": False,
                              "contiguous_gradients": False},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": float(train.grad_clip),
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }
    if dist_cfg.bf16:
        if device.type != "cuda":
            log.warning("dist.bf16 is on but the device is %s: training in fp32 (bf16 is CUDA-only)", device)
        else:
            cfg["bf16"] = {"enabled": True}
    return cfg


def dense_engine(params: Iterable[nn.Parameter], train: TrainConfig, dist_cfg: DistConfig, device: torch.device,
                 world_size: int, local_rank: int = 0):
    """A DeepSpeed engine over ``params`` (trainable dense parameters), or None when there are none.

    Returns the engine; ``engine.backward(loss)`` reduces the dense gradients (averaged over ranks),
    ``engine.step()`` clips and updates."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return None
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeed asserts it; torchrun/Ray set it already
    import deepspeed

    import torch.distributed as dist

    for p in params:
        if p.dim() == 0:
            # DeepSpeed's start-up broadcast views every parameter as bytes, which a 0-dim tensor cannot
            # be; this attribute makes it skip the parameter (its only other use is LoRA offload, off
            # here), and we broadcast it ourselves so all ranks still start from rank 0's value.
            p.ds_optim_param = True
            if dist.is_initialized() and dist.get_world_size() > 1:
                with torch.no_grad():
                    dist.broadcast(p.data, src=0)
    holder = DenseParameters(params)
    opt = dense_optimizer(train.dense_optimizer, params, train.dense_lr)
    engine, _, _, _ = deepspeed.initialize(model=holder, optimizer=opt,
                                           config=deepspeed_config(train, dist_cfg, device, world_size),
                                           dist_init_required=False)
    return engine
