"""Distributed training entry point, one process per rank.

    torchrun --nproc_per_node=N -m goat_dist.train -c CONFIG [--set section.key=value ...] [--run-dir DIR]
             [--resume latest|URL]
    python -m goat_dist.train -c CONFIG          # world size 1, through the same code path

Reads the world from the launcher's environment (``parallel.init_process_group``), builds a
``DistributedTrainer`` and runs ``fit``; rank 0 writes the run directory and draws the progress bar.
``goat train --nproc N`` spawns exactly this under torchrun.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from goat_dist.log import get_logger, setup_logging

log = get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m goat_dist.train", description="distributed RecGOAT training (one rank)")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<config name>)")
    p.add_argument("--resume", default=None, metavar="latest|URL",
                   help="continue from a checkpoint ('latest': newest complete one under checkpoint.dir; none = "
                        "start from scratch)")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    from goat_dist.checkpoint import CheckpointError
    from goat_dist.config import ConfigError, load_config
    from goat_dist.data.errors import DataError
    from goat_dist.engine.distributed import DistributedTrainer
    from goat_dist.engine.trainer import NonFiniteError
    from goat_dist.parallel.process_group import destroy_process_group, init_process_group

    try:
        cfg = load_config(args.config, args.set or [])
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return 2
    run_dir = Path(args.run_dir or f"runs/{Path(args.config).stem}")
    env = init_process_group(cfg.dist)
    trainer = None
    try:
        trainer = DistributedTrainer(cfg, run_dir, env).build()
        if args.resume:
            trainer.resume(args.resume)
        final = trainer.fit()
        log.info("run directory %s: config.yaml, metrics.jsonl, final.json", run_dir)
        return 0 if final is not None else 1
    except DataError as exc:
        log.error("data error: %s", exc)
        return 2
    except ConfigError as exc:  # resuming with a config that changes training
        log.error("config error: %s", exc)
        return 2
    except CheckpointError as exc:
        log.error("checkpoint error: %s", exc)
        return 2
    except NonFiniteError as exc:
        log.error("training stopped: %s", exc)
        return 3
    finally:
        if trainer is not None:
            trainer.close()
        destroy_process_group(env)


if __name__ == "__main__":
    sys.exit(main())
