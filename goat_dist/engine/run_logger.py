"""What a run leaves behind: ``metrics.jsonl`` (one JSON object per log event), a TensorBoard log,
and PNG plots of the loss and validation curves. Only rank 0 writes; other ranks get a no-op logger.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from goat_dist.log import get_logger

logger = get_logger(__name__)


class RunLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 append: bool = False):
        """``append=False`` (a new run) starts ``metrics.jsonl`` afresh, so a reused run directory
        never mixes two runs' curves; ``append=True`` continues it (resuming a run)."""
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._events: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._fh = (self.run_dir / "metrics.jsonl").open("a" if append else "w", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError as exc:  # tensorboard is installed by `make install`; say so if not
                logger.warning("TensorBoard log disabled: %s", exc)

    def log(self, event: str, step: int, **values: Any) -> None:
        """Append one event (``train`` / ``valid`` / ``test`` ...) with scalar values."""
        if not self.enabled:
            return
        record = {"event": event, "step": int(step), "time": round(time.time(), 3), **values}
        self._events.append(record)
        self._fh.write(json.dumps(record, default=float) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{event}/{key}", value, step)

    def write_json(self, name: str, payload: dict[str, Any]) -> Path | None:
        if not self.enabled:
            return None
        path = self.run_dir / name
        path.write_text(json.dumps(payload, indent=2, default=float) + "\n", encoding="utf-8")
        return path

    def plot(self, metric: str) -> list[Path]:
        """``loss.png`` (training loss and its parts over steps) and ``valid.png`` (``metric`` over
        epochs) from the events logged so far."""
        if not self.enabled:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        written = []
        train = [e for e in self._events if e["event"] == "train"]
        if train:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            keys = [k for k in train[-1] if k == "loss" or k.startswith("loss_")]
            for key in keys:
                ax.plot([e["step"] for e in train if key in e], [e[key] for e in train if key in e], label=key)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(self.run_dir / "loss.png", dpi=100)
            plt.close(fig)
            written.append(self.run_dir / "loss.png")
        valid = [e for e in self._events if e["event"] == "valid" and metric in e]
        if valid:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot([e["epoch"] for e in valid], [e[metric] for e in valid], marker="o")
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"valid {metric}")
            fig.tight_layout()
            fig.savefig(self.run_dir / "valid.png", dpi=100)
            plt.close(fig)
            written.append(self.run_dir / "valid.png")
        return written

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            if self._tb is not None:
                self._tb.close()
