"""Distributed evaluation: 2 gloo ranks on CPU give the single-process soups bit for bit."""

import torch
import torch.distributed as dist
from spawn import free_port, join_group, run_ranks

from mmsoup.determinism import pinned
from mmsoup.distributed import DistributedEvaluator, run_on_rank0, shard_bounds
from mmsoup.errors import MMSoupError
from mmsoup.evaluate import Evaluator
from mmsoup.models import create_classifier
from mmsoup.soups import greedy_soup, logit_ensemble, manifold_mixing_soup

N, BATCH = 36, 8  # 5 batches: rank 0 gets 3 (24 images), rank 1 gets 2 (12 images)


def _case():
    """Three tiny-ViT ingredients around one init, held-out and test images, a 4-way partition."""
    init = create_classifier(seed=0).state_dict()
    g = torch.Generator().manual_seed(0)
    pool = [
        {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in init.items()} for _ in range(3)
    ]
    x = torch.randn(2 * N, 3, 28, 28, generator=g)
    model = create_classifier(seed=1).eval()
    model.load_state_dict(pool[0])
    with torch.no_grad():
        y = model(x).argmax(-1)  # labels the pool mostly gets right: MMS has something to find
    y[::4] = torch.randint(0, 10, y[::4].shape, generator=g)
    keys = list(init)
    comps = {
        "stem": [k for k in keys if k.startswith("model.visual.") and "resblocks" not in k],
        "blocks01": [k for k in keys if ".resblocks.0." in k or ".resblocks.1." in k],
        "blocks23": [k for k in keys if ".resblocks.2." in k or ".resblocks.3." in k],
        "head": [k for k in keys if k.startswith("classification_head")],
    }
    return pool, (x[:N], y[:N]), (x[N:], y[N:]), comps


def _recipes(pool, heldout: Evaluator, test: Evaluator, comps) -> dict:
    """Everything rank 0 (or the single process) computes; plain data for comparison."""
    mms = manifold_mixing_soup(pool, heldout, comps, tau=0.0, budget=10, progress=False)
    greedy = greedy_soup(pool, heldout, progress=False)
    ens = logit_ensemble(pool, heldout)
    errors = []
    try:  # a state dict that does not fit must fail on rank 0 without hanging the workers
        heldout({"nope": torch.zeros(1)})
    except MMSoupError as e:
        errors.append(str(e))
    return {
        "mms_trace": [(r["candidate"], r["lambdas"], r["acc"]) for r in mms.trace],
        "mms_state": mms.state_dict,
        "mms_acc": mms.val_acc,
        "greedy": (greedy.ingredients, greedy.val_acc),
        "test_acc": test(mms.state_dict),
        "ensemble_logits": ens.logits,
        "errors": errors,
    }


def _worker(rank: int, port: int, out: str) -> None:
    join_group(rank, port)
    try:
        pool, (hx, hy), (tx, ty), comps = _case()
        model = create_classifier(seed=2)
        heldout = DistributedEvaluator(
            model, hx, hy, name="heldout", device="cpu", batch_size=BATCH
        )
        test = DistributedEvaluator(model, tx, ty, name="test", device="cpu", batch_size=BATCH)
        assert heldout.images.shape[0] == (24 if rank == 0 else 12)
        result = run_on_rank0(lambda: _recipes(pool, heldout, test, comps))
        if rank == 0:
            torch.save(result, out)
        else:
            assert result is None
    finally:
        dist.destroy_process_group()


def test_shards_are_whole_batches_covering_every_example():
    for n, world in ((36, 2), (36, 3), (5, 4), (1000, 7)):
        bounds = [shard_bounds(n, BATCH, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(lo % BATCH == 0 or lo == n for lo, _ in bounds)  # empty shards sit at the end


def test_two_gloo_ranks_equal_a_single_process(tmp_path):
    out = tmp_path / "rank0.pt"
    run_ranks(_worker, (free_port(), str(out)))
    dist_res = torch.load(out, weights_only=False)

    with pinned(1):  # the ranks ran with one thread each
        pool, (hx, hy), (tx, ty), comps = _case()
        model = create_classifier(seed=2)
        heldout = Evaluator(model, hx, hy, device="cpu", batch_size=BATCH)
        test = Evaluator(model, tx, ty, device="cpu", batch_size=BATCH)
        single = _recipes(pool, heldout, test, comps)

    assert len(single["mms_trace"]) > 5
    assert dist_res["mms_trace"] == single["mms_trace"]  # same λ asked, same accuracies
    assert dist_res["mms_acc"] == single["mms_acc"]
    assert all(torch.equal(dist_res["mms_state"][k], v) for k, v in single["mms_state"].items())
    assert dist_res["greedy"] == single["greedy"]
    assert dist_res["test_acc"] == single["test_acc"]
    assert torch.equal(dist_res["ensemble_logits"], single["ensemble_logits"])
    assert len(dist_res["errors"]) == 1 and "lacks" in dist_res["errors"][0]


def test_entry_point_runs_alone_and_only_rank0_writes(tmp_path, capsys):
    """`mmsoup distributed` without torchrun: one process, a soup file and a JSON summary."""
    import json

    import numpy as np

    from mmsoup.checkpoints import save_state_dict
    from mmsoup.distributed_cli import main

    pool, _, _, _ = _case()
    paths = [save_state_dict(sd, tmp_path / f"model_{i}.safetensors") for i, sd in enumerate(pool)]
    g = np.random.default_rng(0)
    np.savez(
        tmp_path / "held.npz",
        images=g.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        labels=g.integers(0, 10, 20),
    )
    out = tmp_path / "greedy.safetensors"
    args = [
        "--ingredients",
        str(tmp_path),
        "--recipe",
        "greedy",
        "--heldout",
        str(tmp_path / "held.npz"),
    ]
    assert (
        main([*args, "--batch-size", "8", "--out", str(out), "--test", str(tmp_path / "held.npz")])
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out.is_file() and summary["world"] == 1 and summary["n_evals"] == len(paths) + 2
    assert summary[str(tmp_path / "held.npz")] == summary["val_acc"]  # the same set, scored again


def test_torchrun_entry_point_of_the_readme_gives_the_one_process_soup(tmp_path):
    """`torchrun -m mmsoup distributed` (README): 2 gloo ranks, through the package's entry point
    (mmsoup.distributed imported once per rank), write the soup one process writes."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np

    from mmsoup.checkpoints import load_state_dict, save_state_dict

    pool, _, _, _ = _case()
    for i, sd in enumerate(pool):
        save_state_dict(sd, tmp_path / f"model_{i}.safetensors")
    g = np.random.default_rng(0)
    held = tmp_path / "held.npz"
    np.savez(
        held, images=g.integers(0, 256, (20, 28, 28), dtype=np.uint8), labels=g.integers(0, 10, 20)
    )
    args = ["--ingredients", str(tmp_path), "--recipe", "greedy", "--heldout", str(held)]
    args += ["--batch-size", "8", "--backend", "gloo", "--device", "cpu"]
    runs = {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
        + ["--master_port", str(free_port()), "-m", "mmsoup", "distributed"],
        "alone": [sys.executable, "-m", "mmsoup", "distributed"],
    }
    summaries = {}
    for name, cmd in runs.items():
        out = tmp_path / f"{name}.safetensors"
        proc = subprocess.run(
            [*cmd, *args, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        summaries[name] = json.loads(proc.stdout.strip().splitlines()[-1])  # rank 0's line only
    assert summaries["torchrun"]["world"] == 2 and summaries["alone"]["world"] == 1
    for key in ("val_acc", "n_evals", "ingredients"):
        assert summaries["torchrun"][key] == summaries["alone"][key]
    a, b = (load_state_dict(tmp_path / f"{n}.safetensors") for n in runs)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_one_rank_of_two_times_out_naming_the_missing_rank(tmp_path, capsys, monkeypatch):
    """WORLD_SIZE=2 and only rank 0 started: after --timeout, one sentence naming rank 1, exit 2."""
    import time

    from mmsoup import cli
    from mmsoup.checkpoints import save_state_dict

    pool, _, _, _ = _case()
    for i, sd in enumerate(pool[:2]):
        save_state_dict(sd, tmp_path / f"model_{i}.safetensors")
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in (env | {"MASTER_PORT": str(free_port())}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    out = tmp_path / "out" / "mms.safetensors"
    argv = ["distributed", "--ingredients", str(tmp_path), "--timeout", "2", "--out", str(out)]
    argv += ["--backend", "gloo"]
    start = time.monotonic()
    assert cli.main(argv) == 2
    assert time.monotonic() - start < 60  # bounded by --timeout, not the 1800 s collective timeout
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "mmsoup: error: Rank 0 of WORLD_SIZE=2 waited 2 s and rank 1 never started; start every "
        "rank (torchrun --nproc_per_node=2 ...) or raise --timeout."
    ]
    assert not out.parent.exists()
