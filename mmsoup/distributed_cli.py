"""`mmsoup distributed`: one soup with its evaluation sets sharded over torchrun ranks.

Every rank loads the pool and the sets as the pipeline's stages do (`mmsoup.context`) and builds a
`DistributedEvaluator` per set (mmsoup.distributed); rank 0 builds the soup and writes it, and
prints its summary as one JSON line.

    torchrun --nproc_per_node=2 -m mmsoup distributed --ingredients runs/embedded/sweep --out mms.safetensors

(`python -m mmsoup distributed`, the package's entry point through `mmsoup.cli`, which imports
this module and mmsoup.distributed once each.)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mmsoup import distributed
from mmsoup.context import EvalSet, load_set, model_paths
from mmsoup.errors import MMSoupError, Parser  # a wrong flag: one line, exit 2
from mmsoup.evaluate import keep_freed_memory
from mmsoup.profiles import dataset_of


def _tensors(profile: str, name: str, npz: Path | None) -> EvalSet:
    """(images, labels, preprocess, projection) of a profile's set, or of an .npz (images, labels)."""
    if npz is None:
        return load_set(profile, name)  # the same images, in the same order, as the stages
    with np.load(npz) as f:
        images, labels = f["images"], f["labels"]
    x = dataset_of(profile).to_tensor(images) if images.ndim == 3 else torch.as_tensor(images)
    return x, torch.as_tensor(labels), None, None


def _pool(items: Sequence[str]) -> list[Path]:
    """The checkpoints of --ingredients: files as given, folders' model_<i> files by i."""
    paths: list[Path] = []
    for item in map(Path, items):
        paths += model_paths(item) if item.is_dir() else [item]
    if not paths:
        raise MMSoupError(
            f"No checkpoints in {list(items)}; pass files or a folder of model_*.safetensors."
        )
    return paths


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `mmsoup distributed` (`python -m mmsoup distributed`, under torchrun or not)."""
    ap = Parser(
        prog="mmsoup distributed",
        description="One soup with evaluation sharded over torchrun ranks.",
    )
    ap.add_argument("--ingredients", nargs="+", required=True, help="checkpoints or folders")
    ap.add_argument(
        "--recipe",
        default="mms",
        help="a recipe of mmsoup.recipes that builds one set of weights: its name or key "
        "(mms, MMS-C8, uniform, greedy, wise, ...; default mms)",
    )
    ap.add_argument(
        "--scheme", default="C26+live", help="partition for 'mms' (MMS-C8 fixes its own)"
    )
    ap.add_argument("--init", type=Path, help="the checkpoint the ingredients were fine-tuned from")
    ap.add_argument("--budget", type=int, default=250)
    ap.add_argument("--tau", type=float, default=0.998)
    ap.add_argument("--optimizer", default="NGOpt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", default="paper", choices=("paper", "author"))
    ap.add_argument("--profile", default="embedded")
    ap.add_argument("--heldout", type=Path, help=".npz with images/labels instead of the profile's")
    ap.add_argument("--test", nargs="*", default=[], help="sets (or .npz) to score the soup on")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--device", default=None)
    ap.add_argument("--backend", default=None, help="gloo / nccl (default: nccl with CUDA)")
    ap.add_argument(
        "--timeout",
        type=float,
        default=distributed.RENDEZVOUS_S,
        help=f"seconds to wait for every rank to start (default: {distributed.RENDEZVOUS_S:g})",
    )
    ap.add_argument("--no-reuse", action="store_true", help="no prefix-activation reuse")
    ap.add_argument("--cache-mb", type=float, default=512.0)
    ap.add_argument("--out", type=Path, required=True, help="the soup (.safetensors), rank 0 only")
    return ap


def check_args(args: argparse.Namespace) -> None:
    """Refuse a bad flag, a missing input or an unwritable --out before any rank starts work."""
    from mmsoup.io import check_readable, check_writable
    from mmsoup.profiles import get_profile
    from mmsoup.recipes import recipe

    get_profile(args.profile)
    rec = recipe(args.recipe)  # an unknown name: one sentence listing the recipes
    if "evaluator" in rec.needs:
        raise MMSoupError(
            f"--recipe {args.recipe!r} needs the whole held-out set in one process; run it with `mmsoup soup`."
        )
    if "anchor" in rec.needs and args.init is None:
        raise MMSoupError(
            f"--recipe {args.recipe!r} needs the weights the ingredients were fine-tuned from; pass --init PATH."
        )
    for flag, value, low in (("--budget", args.budget, 1), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise MMSoupError(f"{flag} {value} is out of range; use an integer >= {low}.")
    if not 0.0 <= args.tau <= 1.0:
        raise MMSoupError(
            f"--tau {args.tau} is out of range; use a number in [0, 1] (paper: 0.998)."
        )
    if not args.timeout > 0 or args.timeout != args.timeout or args.timeout == float("inf"):
        raise MMSoupError(
            f"--timeout {args.timeout} is out of range; use a number of seconds > 0 (default 300)."
        )
    if not args.cache_mb >= 0:
        raise MMSoupError(f"--cache-mb {args.cache_mb} is out of range; use a number >= 0.")
    for item in args.ingredients:
        if not Path(item).is_dir():
            check_readable(item, "--ingredients")
    for flag, path in (("--heldout", args.heldout), ("--init", args.init)):
        if path is not None:
            check_readable(path, flag)
    data = dataset_of(args.profile)
    for name in args.test:
        if name.endswith(".npz"):
            check_readable(name, "--test")
        elif name not in data.sets:
            raise MMSoupError(
                f"--test {name!r} is not a {data.title} set; pick from {', '.join(data.sets)} or pass an .npz."
            )
    check_writable(args.out, "--out", file=True)


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Build the evaluators on every rank, the soup on rank 0; rank 0's summary, None elsewhere."""
    from mmsoup.checkpoints import load_state_dict
    from mmsoup.factories import num_classes
    from mmsoup.models import create_classifier
    from mmsoup.partition import partition
    from mmsoup.profiles import get_profile
    from mmsoup.recipes import Pool, recipe
    from mmsoup.soups import optimizer_class

    check_args(args)
    rec = recipe(args.recipe)
    rank, world = distributed.init(args.backend, rendezvous_s=args.timeout)
    paths = _pool(args.ingredients)
    first = load_state_dict(paths[0])
    head = num_classes(first, get_profile(args.profile).arch)  # the family's head (factories)
    model = create_classifier(get_profile(args.profile).arch, head)
    pool = Pool(
        ingredients=paths,
        heldout=None,  # the sharded evaluator, below
        anchor=args.init,
        scheme=args.scheme,
        partition=lambda scheme: partition(first, scheme, model=model),
        mms=dict(
            tau=args.tau,
            budget=args.budget,
            optimizer=args.optimizer,
            seed=args.seed,
            variant=args.variant,
        ),
        progress=False,
    )
    if "components" in rec.needs:  # a wrong scheme or optimizer fails before the data are loaded
        pool.components(rec.scheme)
        optimizer_class(args.optimizer)
    if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu"):
        keep_freed_memory()  # as the pipeline's stages on CPU
    opts = dict(device=args.device, batch_size=args.batch_size, reuse=not args.no_reuse)
    opts |= {"cache_mb": args.cache_mb}
    sets = {"heldout": _tensors(args.profile, "heldout", args.heldout)}
    for name in args.test:
        sets[name] = _tensors(args.profile, name, Path(name) if name.endswith(".npz") else None)
    evs = {
        name: distributed.DistributedEvaluator(
            model, x, y, name=name, preprocess=pre, projection=proj, **opts
        )
        for name, (x, y, pre, proj) in sets.items()
    }
    pool.heldout = evs["heldout"]

    def soup() -> dict[str, Any]:
        t0 = time.perf_counter()
        res = rec.build(pool)  # one set of weights (check_args refused the ensembles)
        res.save(args.out)
        summary = {"val_acc": res.val_acc, "n_evals": res.n_evals, "ingredients": res.ingredients}
        summary |= {name: e(res.state_dict) for name, e in evs.items() if name != "heldout"}
        return summary | {
            "recipe": args.recipe,
            "world": world,
            "seconds": time.perf_counter() - t0,
        }

    return distributed.run_on_rank0(soup)


def main(argv: Sequence[str] | None = None) -> int:
    """`mmsoup distributed ...` (under torchrun or alone): print rank 0's summary as JSON."""
    summary = run(build_parser().parse_args(argv))
    if summary is not None:
        print(json.dumps(summary))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
