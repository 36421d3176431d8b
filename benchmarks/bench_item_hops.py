"""Item-item subgraph sampling per batch: every kNN graph at ``max(gat_layers, item_knn_id_layers)``
hops (the baseline) vs each graph only as deep as its consumers read (``item_item_hops``).

    python -m benchmarks.bench_item_hops -c configs/tiktok.yaml [--set KEY=VALUE ...]

On ``configs/tiktok.yaml`` the ID propagation (3 hops) runs over the image graph only, so per
modality the audio graph needs its GAT's 1 hop. For the first ``--batches`` training batches of
epoch 0, each modality's subgraph is sampled by both samplers (median of ``--repeats`` timings per
batch, summed over batches) and its pickled size measured (what a loader worker ships to the
trainer). One torch thread. Writes ``--out`` (default ``benchmarks/results/bench_item_hops.json``)
and, unless ``--no-row``, a row of ``benchmarks/results/results.md``.
"""
from __future__ import annotations

import argparse
import pickle

import torch

from benchmarks.harness import RESULTS_DIR, append_result_row, machine_info, time_fn, write_json
from goat_dist.config import load_config
from goat_dist.engine.trainer import prepare_dataset
from goat_dist.graph import build_graphs
from goat_dist.log import get_logger, setup_logging
from goat_dist.model.recgoat import item_item_hops, used_modalities
from goat_dist.sampling.blocks import ITEM
from goat_dist.sampling.loader import MiniBatchSampler
from goat_dist.sampling.triples import TripleSampler

log = get_logger(__name__)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", default="configs/tiktok.yaml")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, as for goat train")
    ap.add_argument("--out", default=str(RESULTS_DIR / "bench_item_hops.json"))
    ap.add_argument("--no-row", action="store_true", help="do not append to benchmarks/results/results.md")
    args = ap.parse_args(argv)
    setup_logging()
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    m = cfg.model
    ds = prepare_dataset(cfg.data)
    mods = used_modalities(m, ds.item_features)
    if not mods:
        raise SystemExit(f"{args.config}: no item modalities, so no item-item graphs to sample")
    graphs = build_graphs(ds, cfg.graph, mods, False, None)
    triples = TripleSampler(ds.train.users, ds.train.items, ds.n_items, graphs.ui.user_items,
                            cfg.train.batch_size, cfg.train.seed)
    n = min(args.batches, triples.num_batches)
    seeds = [torch.unique(torch.cat(triples.batch(i)[1:])) for i in range(n)]
    cases = {"baseline": max(m.gat_layers, m.item_knn_id_layers), "per_modality": item_item_hops(m, mods)}
    res: dict = {}
    for case, hops in cases.items():
        s = MiniBatchSampler(triples, graphs.ui.user_items, graphs.ui.item_users,
                             hops={"user_item": m.id_layers, "item_item": hops, "user_user": m.gat_layers},
                             fanouts=cfg.sampling.fanouts, item_item=graphs.item_item)
        for mod in mods:
            smp = s.item_item[mod]
            t = sum(time_fn(lambda ii=ii: smp.sample({ITEM: ii}), repeats=args.repeats)["median_s"] for ii in seeds)
            size = sum(len(pickle.dumps(smp.sample({ITEM: ii}))) for ii in seeds)
            hop = hops if isinstance(hops, int) else hops[mod]
            res.setdefault(mod, {})[case] = {"hops": hop, "ms_per_batch": 1e3 * t / n, "mb_per_batch": size / n / 1e6}
            log.info("%s %s (%d hops): %.1f ms, %.2f MB per batch", case, mod, hop, 1e3 * t / n, size / n / 1e6)
    mach = machine_info()
    for mod, r in res.items():
        b, o = r["baseline"], r["per_modality"]
        r["time_ratio"] = b["ms_per_batch"] / o["ms_per_batch"]
        r["size_ratio"] = b["mb_per_batch"] / o["mb_per_batch"]
        if not args.no_row:
            append_result_row("item_item_hops", f"{args.config} {mod}: {b['hops']} -> {o['hops']} hops",
                              f"{o['ms_per_batch']:.1f} ms, {o['mb_per_batch']:.2f} MB / batch",
                              f"{b['ms_per_batch']:.1f} ms, {b['mb_per_batch']:.2f} MB / batch", r["time_ratio"], mach)
    write_json(args.out, {"config": args.config, "overrides": args.overrides, "batches": n,
                          "batches_per_epoch": triples.num_batches, "batch_size": cfg.train.batch_size,
                          "repeats": args.repeats, "modalities": res, "machine": mach})
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
