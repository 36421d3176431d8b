"""The ``goat`` command: argument parsing only; every subcommand calls into the package.

    goat train -c CONFIG [--set section.key=value ...] [--run-dir DIR] [--nproc N] [--resume latest|URL]
    goat data validate DIR
    goat data synth --users U --items I --interactions E --out DIR [--modalities image:512,text:384]
                    [--user-profiles 384] [--seed S]
    goat data profiles DIR --text item_text.tsv
    goat data movielens ../shared/data/ml-100k --out data/ml100k
    goat bench sampler|sinkhorn|train|comm|all [--quick] [--json FILE] [benchmark options]
    goat export --checkpoint URL --out URL [--faiss [flat|ivf]] [--nlist N] [--nprobe N]
                [--weights best|last] [--set section.key=value ...]
"""
from __future__ import annotations

import argparse
import sys

from goat_dist.log import setup_logging


def _parse_modalities(text: str) -> dict[str, int]:
    """``"image:512,text:384"`` -> {"image": 512, "text": 384}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, dim = part.partition(":")
        if not sep or not name or not dim.isdigit() or int(dim) <= 0:
            raise argparse.ArgumentTypeError(f"--modalities: {part!r} is not name:positive_dim")
        if name in out:
            raise argparse.ArgumentTypeError(f"--modalities: {name!r} given twice")
        out[name] = int(dim)
    return out


def _torchrun_argv(args: argparse.Namespace) -> list[str]:
    """``goat train --nproc N ...`` -> the equivalent ``torchrun --nproc_per_node=N -m goat_dist.train ...``."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
            "-m", "goat_dist.train", "-c", args.config, "--log-level", args.log_level]
    for item in args.set or []:
        argv += ["--set", item]
    if args.run_dir:
        argv += ["--run-dir", args.run_dir]
    if args.resume:
        argv += ["--resume", args.resume]
    return argv


def _cmd_train(args: argparse.Namespace) -> int:
    if args.nproc is not None:
        import subprocess

        if args.nproc < 1:
            raise SystemExit("goat train: --nproc must be >= 1")
        return subprocess.call(_torchrun_argv(args))
    from goat_dist.checkpoint import CheckpointError
    from goat_dist.config import load_config
    from goat_dist.engine.run import train_main
    from goat_dist.engine.trainer import NonFiniteError

    cfg = load_config(args.config, args.set or [])
    try:
        return train_main(cfg, run_dir=args.run_dir, resume=args.resume)
    except CheckpointError as exc:
        print(f"goat: checkpoint error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"goat: training stopped: {exc}", file=sys.stderr)
        return 3


def _cmd_data_validate(args: argparse.Namespace) -> int:
    from goat_dist.data.validate import validate_dataset

    report = validate_dataset(args.path)
    print(report.format())
    return 0 if report.ok else 1


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from goat_dist.data.synth import generate

    stats = generate(args.out, users=args.users, items=args.items, interactions=args.interactions,
                     modalities=args.modalities, user_profiles=args.user_profiles, seed=args.seed)
    for key, value in stats.items():
        print(f"{key}: {value}")
    return 0


def _cmd_data_profiles(args: argparse.Namespace) -> int:
    from goat_dist.data.profiles import make_profiles

    for key, value in make_profiles(args.path, args.text, max_items=args.max_items).items():
        print(f"{key}: {value}")
    return 0


def _cmd_data_movielens(args: argparse.Namespace) -> int:
    from goat_dist.data.movielens import make_ml100k

    for key, n in make_ml100k(args.src, args.out, seed=args.seed, min_rating=args.min_rating).items():
        print(f"{key}: {n}")
    print(f"item texts: {args.out}/item_text.tsv (next: goat data profiles {args.out} --text item_text.tsv)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from goat_dist.checkpoint import CheckpointError
    from goat_dist.checkpoint.export import export_main

    try:
        manifest = export_main(args.checkpoint, args.out, faiss_kind=args.faiss, nlist=args.nlist,
                               nprobe=args.nprobe, overrides=args.set or [], weights=args.weights)
    except CheckpointError as exc:
        print(f"goat: checkpoint error: {exc}", file=sys.stderr)
        return 2
    m = manifest["model"]
    print(f"exported {m['n_users']} users, {m['n_items']} items (d={m['dim']}) to {args.out}: "
          f"{', '.join(sorted(manifest['files']))}")
    return 0


BENCHMARKS = ("sampler", "sinkhorn", "train", "comm")
"""``goat bench all`` runs these in this order (``--quick``: a small version of each)."""


def _bench_argv(name: str, rest: list[str]) -> list[str]:
    """``--quick`` runs never overwrite the full results: without an explicit ``--json`` they write
    ``benchmarks/results/bench_<name>_quick.json`` (+ PNG)."""
    if "--quick" in rest and not any(a == "--json" or a.startswith("--json=") for a in rest):
        from benchmarks.harness import RESULTS_DIR

        return [*rest, "--json", str(RESULTS_DIR / f"bench_{name}_quick.json")]
    return list(rest)


def _cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    import importlib

    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    code = 0
    for name in names:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        code |= int(module.main(_bench_argv(name, rest)) or 0)
    return code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="goat", description="goat_dist: distributed RecGOAT training")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("-c", "--config", required=True)
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    t.add_argument("--run-dir", default=None, help="run directory (default runs/<config name>)")
    t.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="distributed: spawn N ranks with torchrun (python -m goat_dist.train); "
                        "without it, the single-process trainer")
    t.add_argument("--resume", default=None, metavar="latest|URL",
                   help="continue from a checkpoint: 'latest' = the newest complete one under checkpoint.dir "
                        "(default RUN_DIR/checkpoints; none found = start from scratch), or a checkpoint URL")
    t.set_defaults(func=_cmd_train)

    d = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    v = d.add_parser("validate", help="check a dataset folder and print its statistics")
    v.add_argument("path")
    v.set_defaults(func=_cmd_data_validate)
    s = d.add_parser("synth", help="generate a synthetic dataset (streamed to disk)")
    s.add_argument("--users", type=int, required=True)
    s.add_argument("--items", type=int, required=True)
    s.add_argument("--interactions", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--modalities", type=_parse_modalities, default={})
    s.add_argument("--user-profiles", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_data_synth)

    pr = d.add_parser("profiles", help="encode item texts and user preference profiles (all-MiniLM-L6-v2)")
    pr.add_argument("path", help="dataset folder (goat format)")
    pr.add_argument("--text", required=True, help="item text TSV: item_id<TAB>title[<TAB>cat1|cat2]")
    pr.add_argument("--max-items", type=int, default=20, help="recent training items named in a profile")
    pr.set_defaults(func=_cmd_data_profiles)
    ml = d.add_parser("movielens", help="MovieLens-100K -> goat format + item_text.tsv")
    ml.add_argument("src", help="folder with u.data and u.item")
    ml.add_argument("--out", required=True)
    ml.add_argument("--seed", type=int, default=0)
    ml.add_argument("--min-rating", type=int, default=4)
    ml.set_defaults(func=_cmd_data_movielens)

    e = sub.add_parser("export", help="export a checkpoint for serving (safetensors + manifest [+ FAISS index])")
    e.add_argument("--checkpoint", required=True,
                   help="a run's checkpoint root (RUN_DIR/checkpoints: its newest complete checkpoint) or one "
                        "checkpoint URL")
    e.add_argument("--out", required=True, help="output folder (path or fsspec URL)")
    e.add_argument("--faiss", nargs="?", const="flat", choices=["flat", "ivf"], default=None,
                   help="also write a FAISS inner-product index over the items (flat = exact; ivf = IndexIVFFlat)")
    e.add_argument("--nlist", type=int, default=0, help="IVF lists (default ~4 sqrt(n_items))")
    e.add_argument("--nprobe", type=int, default=0, help="IVF lists searched per query (default min(nlist, 16))")
    e.add_argument("--weights", choices=["best", "last"], default="best",
                   help="best = the valid-selected snapshot (default), last = the weights at the checkpoint's step")
    e.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override the checkpoint's config (e.g. data.path=... when the dataset moved)")
    e.set_defaults(func=_cmd_export)

    b = sub.add_parser("bench", help="benchmarks (each writes JSON and a PNG)")
    b.add_argument("name", choices=[*BENCHMARKS, "all"])
    b.set_defaults(func=_cmd_bench, takes_rest=True)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    setup_logging(args.log_level)
    from goat_dist.config import ConfigError
    from goat_dist.data.errors import DataError

    try:
        if getattr(args, "takes_rest", False):
            return args.func(args, rest)
        return args.func(args)
    except ConfigError as exc:
        print(f"goat: config error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"goat: data error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
