"""Communication meter: bytes through every ``torch.distributed`` collective, per call site.

    with comm_meter() as meter:
        trainer.train_step(batch)
    meter.summary()      # {tag: {"op", "calls", "payload_bytes", "sent_bytes", "recv_bytes"}}

Design choices:
- Measured from the outside: the collective functions of ``torch.distributed`` (and the same names
  in ``distributed_c10d``, which TorchRec's ``comm_ops``, DeepSpeed's ``deepspeed.comm`` TorchBackend
  and ``torch.distributed.nn.functional`` all resolve at call time) are replaced by counting
  wrappers for the duration of the context and restored afterwards. DeepSpeed caches
  ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` on its backend object at initialisation
  (``cdb.all_gather_function``); those cached references are wrapped too. TorchRec's functional
  all-to-all (``_functional_collectives.all_to_all_single``, its compiled path) is wrapped as well.
  Object collectives (``all_gather_object`` ...) are not wrapped: the tensor collectives they call
  inside ``distributed_c10d`` are counted instead. A nested wrapped call (``_all_gather_base`` ->
  ``all_gather_into_tensor``) is counted once.
- Call site: an explicit ``meter.tag(name)`` context wins; otherwise the stack is inspected
  (``classify``): the first frame outside the communication layers (this file, ``torch.distributed``'s
  c10d, ``deepspeed.comm``, ``torch.autograd.function``) names the collective, e.g. TorchRec's KJT
  all-to-all of the input ids (``dist_data.py``), the sequence-embedding all-to-all forward
  (``comm_ops.py`` forward: output embeddings) and backward (gradients), the InfoNCE all-gather
  (``losses/infonce.py``), the OAT statistics all-reduce (``torch.distributed.nn.functional`` called
  by ``model/fusion.py``), DeepSpeed ZeRO's gradient reduction / parameter all-gather / norm.
- Bytes, per rank and call, three numbers: ``payload`` = this rank's input tensor(s) in bytes
  (``numel * element_size``); ``sent`` / ``recv`` = bytes this rank sends to / receives from OTHER
  ranks under the reference algorithm of each collective (self-traffic excluded):
  all_reduce: ring, ``2 (W-1)/W n`` each way; all_gather(_into_tensor): ``(W-1) n`` sent, the other
  ranks' blocks received; reduce_scatter(_tensor): the other ranks' blocks sent, ``(W-1) n_out``
  received; all_to_all(_single): the split rows addressed to / from other ranks; broadcast: direct
  (root sends ``(W-1) n``, every other rank receives ``n``); reduce/gather/scatter likewise; barrier 0.
  The backend may move different bytes on the wire (gloo's algorithms, NCCL's trees): ``sent``/``recv``
  are the algorithm-level volume the cost model (``parallel/cost_model.py``) predicts.
- ``phase`` is ``backward`` when the autograd engine is executing a node (gradient all-to-all,
  DeepSpeed's reduction hooks, the InfoNCE gather's backward), else ``forward``.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from goat_dist.log import get_logger

log = get_logger(__name__)

OPS = ("all_reduce", "all_reduce_coalesced", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
       "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all",
       "all_to_all_single", "gather", "scatter", "barrier")
"""The ``torch.distributed`` collectives the meter wraps."""

_INFRA = ("goat_dist/parallel/comm_meter.py", "torch/distributed/distributed_c10d.py",
          "torch/distributed/c10d_logger.py", "torch/distributed/_functional_collectives.py", "deepspeed/comm/",
          "torch/autograd/function.py", "torch/utils/_contextlib.py", "deepspeed/utils/nvtx.py")
"""Frames skipped when looking for the call site (communication layers and decorators)."""


@dataclass(slots=True)
class CommRecord:
    """One collective call on this rank (bytes as described in the module docstring)."""

    op: str
    tag: str
    phase: str
    payload_bytes: int
    sent_bytes: int
    recv_bytes: int
    dtype: str
    site: str


def _nbytes(t: Any) -> int:
    if torch.is_tensor(t):
        return int(t.numel()) * int(t.element_size())
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _dtype(t: Any) -> str:
    if torch.is_tensor(t):
        return str(t.dtype).replace("torch.", "")
    if isinstance(t, (list, tuple)) and t:
        return _dtype(t[0])
    return ""


def _group_rank_size(group) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    if isinstance(group, str):  # functional collectives name their group
        return dist.get_rank(), dist.get_world_size()
    return dist.get_rank(group), dist.get_world_size(group)


def _group_rank_of(global_rank: int, group) -> int:
    if group is None or isinstance(group, str) or global_rank is None:
        return global_rank
    try:
        return dist.get_group_rank(group, global_rank)
    except Exception:  # the default group (or an older torch): global rank == group rank
        return global_rank


def collective_bytes(op: str, a: dict[str, Any], rank: int, world: int) -> tuple[int, int, int, Any]:
    """``(payload, sent, recv, tensor)`` of one call, ``a`` = its bound arguments (torch's names)."""
    W, r = world, rank
    if op in ("all_reduce",):
        n = _nbytes(a["tensor"])
        return n, 2 * (W - 1) * n // W, 2 * (W - 1) * n // W, a["tensor"]
    if op == "all_reduce_coalesced":
        n = _nbytes(a["tensors"])
        return n, 2 * (W - 1) * n // W, 2 * (W - 1) * n // W, a["tensors"]
    if op == "broadcast":
        n, src = _nbytes(a["tensor"]), _group_rank_of(a.get("src"), a.get("group"))
        if src is None:
            src = a.get("group_src", 0)
        return n, (W - 1) * n if r == src else 0, 0 if r == src else n, a["tensor"]
    if op == "reduce":
        n, dst = _nbytes(a["tensor"]), _group_rank_of(a.get("dst"), a.get("group"))
        if dst is None:
            dst = a.get("group_dst", 0)
        return n, 0 if r == dst else n, (W - 1) * n if r == dst else 0, a["tensor"]
    if op == "all_gather":
        n, outs = _nbytes(a["tensor"]), a["tensor_list"]
        return n, (W - 1) * n, sum(_nbytes(t) for j, t in enumerate(outs) if j != r), a["tensor"]
    if op in ("all_gather_into_tensor", "_all_gather_base"):
        n_in, n_out = _nbytes(a["input_tensor"]), _nbytes(a["output_tensor"])
        return n_in, (W - 1) * n_in, n_out - n_in, a["input_tensor"]
    if op == "reduce_scatter":
        ins = a["input_list"]
        return (_nbytes(ins), sum(_nbytes(t) for j, t in enumerate(ins) if j != r), (W - 1) * _nbytes(a["output"]),
                a["output"])
    if op in ("reduce_scatter_tensor", "_reduce_scatter_base"):
        n_in, n_out = _nbytes(a["input"]), _nbytes(a["output"])
        return n_in, n_in - n_out, (W - 1) * n_out, a["input"]
    if op == "all_to_all_single":
        x, y = a["input"], a["output"]
        return (_nbytes(x), _split_bytes(x, a.get("input_split_sizes"), r, W),
                _split_bytes(y, a.get("output_split_sizes"), r, W), x)
    if op == "funcol_all_to_all_single":
        x = a["self"]
        row = _nbytes(x) // max(1, x.shape[0]) if x.dim() else _nbytes(x)
        outs = a.get("output_split_sizes")
        recv = (sum(outs) - outs[r]) * row if outs else _split_bytes(x, None, r, W)
        return _nbytes(x), _split_bytes(x, a.get("input_split_sizes"), r, W), recv, x
    if op == "all_to_all":
        ins, outs = a["input_tensor_list"], a["output_tensor_list"]
        return (_nbytes(ins), sum(_nbytes(t) for j, t in enumerate(ins) if j != r),
                sum(_nbytes(t) for j, t in enumerate(outs) if j != r), ins)
    if op == "gather":
        n, dst = _nbytes(a["tensor"]), _group_rank_of(a.get("dst"), a.get("group"))
        dst = 0 if dst is None else dst
        return n, 0 if r == dst else n, (W - 1) * n if r == dst else 0, a["tensor"]
    if op == "scatter":
        n, src = _nbytes(a["tensor"]), _group_rank_of(a.get("src"), a.get("group"))
        src = 0 if src is None else src
        lst = a.get("scatter_list") or []
        return (_nbytes(lst) if r == src else 0, sum(_nbytes(t) for j, t in enumerate(lst) if j != r) if r == src
                else 0, 0 if r == src else n, a["tensor"])
    if op == "barrier":
        return 0, 0, 0, None
    raise KeyError(f"comm_meter: no byte rule for collective {op!r}")


def _split_bytes(x: torch.Tensor, splits, r: int, W: int) -> int:
    """Bytes of ``x`` (split along dim 0 into ``splits`` rows per rank, equal when None) not at ``r``."""
    if x.dim() == 0:
        return 0
    rows = int(x.shape[0])
    row = _nbytes(x) // rows if rows else 0
    if not splits:
        return (rows - rows // W) * row
    return (rows - int(splits[r])) * row


# ---- call-site classification ----------------------------------------------------------------------

def _frames(start) -> list[tuple[str, str]]:
    out, f = [], start
    while f is not None:
        out.append((f.f_code.co_filename.replace("\\", "/"), f.f_code.co_name))
        f = f.f_back
    return out


def classify(op: str, frames: list[tuple[str, str]]) -> str:
    """Tag of a call from its stack (innermost first; ``(filename, function)`` pairs).

    Tags: ``emb_a2a_ids`` (TorchRec KJT all-to-all: splits, lengths and id values),
    ``emb_a2a_out`` (embedding rows back to the requesters), ``emb_a2a_grad`` (their gradients
    to the owners), ``infonce_allgather`` / ``infonce_allgather_grad`` / ``infonce_sizes``,
    ``loss_scalars`` (the global-value all-reduces of loss terms and the batch size),
    ``oat_stats`` / ``oat_stats_grad``, ``zero_grad_reduce`` / ``zero_param_allgather`` /
    ``zero_grad_norm`` / ``zero_overflow_check`` / ``zero_other`` (DeepSpeed), ``nonfinite_flags``
    (the trainer's all-gather of per-rank non-finite loss flags), ``other:<file>:<function>``."""
    user = [(f, n) for f, n in frames if not any(s in f for s in _INFRA)]
    if not user:
        return "other"
    files = [f for f, _ in user]
    f0, n0 = user[0]
    if "torchrec/distributed/dist_data.py" in f0:
        return "emb_a2a_ids"
    if "torchrec/distributed/comm_ops.py" in f0:
        return "emb_a2a_grad" if n0 == "backward" else "emb_a2a_out"
    if "goat_dist/losses/infonce.py" in f0:
        if n0 == "backward":
            return "infonce_allgather_grad"
        if n0 == "gather_sizes":
            return "infonce_sizes"
        if n0 == "global_value_local_grad":
            return "loss_scalars"
        return "infonce_allgather"
    if "goat_dist/model/recgoat.py" in f0 and n0 == "compute_loss":
        return "loss_scalars"
    if "goat_dist/engine/" in f0 and "nonfinite" in n0:
        return "nonfinite_flags"
    if "torch/distributed/nn/functional.py" in f0:
        if any("goat_dist/model/fusion.py" in f for f in files):
            return "oat_stats"
        # its backward re-enters the autograd all-reduce (``_AllReduce.apply`` inside ``backward``)
        in_backward = any(n == "backward" and "torch/distributed/nn/functional.py" in f for f, n in user)
        return "oat_stats_grad" if in_backward else "dist_nn_functional"
    if any("deepspeed/" in f for f in files):
        names = {n for f, n in user if "deepspeed/" in f}
        if any("overflow" in n for n in names):
            return "zero_overflow_check"
        if any("norm" in n for n in names):
            return "zero_grad_norm"
        if op in ("all_gather", "all_gather_into_tensor", "_all_gather_base"):
            return "zero_param_allgather"
        if op in ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base"):
            return "zero_grad_reduce"
        return "zero_other"
    short = f0.rsplit("site-packages/", 1)[-1].rsplit("goat_dist/", 1)[-1]
    return f"other:{short}:{n0}"


# ---- the meter ----------------------------------------------------------------------------------

class CommMeter:
    """Records of the collectives called while the meter is active (``comm_meter``)."""

    def __init__(self, classify_fn: Callable[[str, list[tuple[str, str]]], str] = classify):
        self.records: list[CommRecord] = []
        self.classify = classify_fn
        self._tags: list[str] = []
        self._local = threading.local()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def tag(self, name: str) -> Iterator[None]:
        """Every collective inside the block gets ``name`` (overrides the stack classification)."""
        self._tags.append(name)
        try:
            yield
        finally:
            self._tags.pop()

    def reset(self) -> None:
        with self._lock:
            self.records.clear()

    def record(self, op: str, bound: dict[str, Any], frame) -> None:
        group = bound.get("group")
        rank, world = _group_rank_size(group)
        payload, sent, recv, t = collective_bytes(op, bound, rank, world)
        frames = _frames(frame)
        tag = self._tags[-1] if self._tags else self.classify(op, frames)
        phase = "backward" if torch._C._current_autograd_node() is not None else "forward"
        site = next((f"{f.rsplit('/', 1)[-1]}:{n}" for f, n in frames if not any(s in f for s in _INFRA)), "?")
        with self._lock:
            self.records.append(CommRecord(op.replace("funcol_", ""), tag, phase, payload, sent, recv, _dtype(t), site))

    def summary(self, steps: int = 1) -> dict[str, dict[str, Any]]:
        """Per tag: op(s), calls, payload/sent/recv bytes — divided by ``steps`` (per-step means)."""
        out: dict[str, dict[str, Any]] = defaultdict(lambda: {"ops": set(), "calls": 0, "payload_bytes": 0,
                                                              "sent_bytes": 0, "recv_bytes": 0, "phases": set()})
        for rec in self.records:
            s = out[rec.tag]
            s["ops"].add(rec.op)
            s["phases"].add(rec.phase)
            s["calls"] += 1
            s["payload_bytes"] += rec.payload_bytes
            s["sent_bytes"] += rec.sent_bytes
            s["recv_bytes"] += rec.recv_bytes
        res = {}
        for tag, s in sorted(out.items()):
            res[tag] = {"ops": sorted(s["ops"]), "phases": sorted(s["phases"]), "calls": s["calls"] / steps,
                        **{k: s[k] / steps for k in ("payload_bytes", "sent_bytes", "recv_bytes")}}
        return res

    def totals(self, steps: int = 1) -> dict[str, float]:
        return {k: sum(getattr(r, k) for r in self.records) / steps for k in ("payload_bytes", "sent_bytes", "recv_bytes")}

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.records]


def _wrap(meter: CommMeter, op: str, fn: Callable) -> Callable:
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        local = meter._local
        if getattr(local, "inside", False):
            return fn(*args, **kwargs)
        try:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            meter.record(op, dict(bound.arguments), sys._getframe(1))
        except Exception as exc:  # never break the collective because of the meter
            log.warning("comm_meter: could not record %s: %s", op, exc)
        local.inside = True
        try:
            return fn(*args, **kwargs)
        finally:
            local.inside = False

    wrapper._comm_meter_original = fn  # type: ignore[attr-defined]
    return wrapper


@contextlib.contextmanager
def comm_meter(classify_fn: Callable[[str, list[tuple[str, str]]], str] = classify) -> Iterator[CommMeter]:
    """Count every collective called inside the block (see the module docstring). Not re-entrant
    (one meter at a time); everything patched is restored on exit, also on error."""
    import torch.distributed.distributed_c10d as c10d

    meter = CommMeter(classify_fn)
    restore: list[tuple[Any, str, Any]] = []
    wrappers: dict[int, Callable] = {}

    def patch(owner, name: str, op: str) -> None:
        fn = getattr(owner, name, None)
        if fn is None:
            return
        if getattr(fn, "_comm_meter_original", None) is not None:
            raise RuntimeError("comm_meter is already active (meters do not nest)")
        w = wrappers.get(id(fn))
        if w is None:
            w = wrappers[id(fn)] = _wrap(meter, op, fn)
        restore.append((owner, name, fn))
        setattr(owner, name, w)

    try:
        for op in OPS:
            for mod in (dist, c10d):
                patch(mod, op, op)
        funcol = sys.modules.get("torch.distributed._functional_collectives")
        if funcol is not None:
            patch(funcol, "all_to_all_single", "funcol_all_to_all_single")
        ds_comm = sys.modules.get("deepspeed.comm.comm")
        cdb = getattr(ds_comm, "cdb", None) if ds_comm is not None else None
        if cdb is not None:
            for attr in ("all_gather_function", "reduce_scatter_function"):
                fn = getattr(cdb, attr, None)
                if fn is not None:
                    name = getattr(fn, "__name__", "")
                    op = {"_all_gather_base": "all_gather_into_tensor",
                          "_reduce_scatter_base": "reduce_scatter_tensor"}.get(name, name)
                    if op in OPS:
                        patch(cdb, attr, op)
        yield meter
    finally:
        for owner, name, fn in reversed(restore):
            setattr(owner, name, fn)
