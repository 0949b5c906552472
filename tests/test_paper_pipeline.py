"""The `paper` profile end to end on stand-ins: ViT-B-32 checkpoints in the released `.pt`
layout, every dataset in its published folder layout, notebooks 01 -> 05 through papermill, on CPU.

The profile spec `paper:n_runs=2,...` keeps everything else of the paper profile (architecture,
data layer, projections, recipes) and uses model_0..model_2 with a small MMS budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from paper_standins import SIZES, WNIDS, make_data_root, save_released_checkpoints
from PIL import Image

from mmsoup.checkpoints import read_sidecar
from mmsoup.context import ingredient_paths
from mmsoup.data.manifest import artifact_path
from mmsoup.errors import MMSoupError
from mmsoup.models import PAPER_ARCH, create_classifier
from mmsoup.pipeline import figure2_stage, finetune_stage
from mmsoup.profiles import get_profile
from mmsoup.recipes import NAMES

SPEC = "paper:n_runs=2,mms_budget=3,heldout_per_class=2"
SETS = (
    "heldout",
    "ImageNet",
    "ImageNetV2",
    "ImageNetSketch",
    "ImageNetR",
    "ObjectNet",
    "ImageNetA",
)


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`python -m mmsoup reproduce --profile paper:...` on a data root of stand-ins."""
    tmp = tmp_path_factory.mktemp("paper")
    root = make_data_root(tmp / "data")
    save_released_checkpoints(root, 3)
    run_dir, figures = tmp / "run", tmp / "figures"
    env = {**os.environ, "MMSOUP_DATA": str(root), "MMSOUP_CACHE": str(tmp / "cache")}
    cmd = [sys.executable, "-m", "mmsoup", "reproduce", "--profile", SPEC]
    cmd += ["--out", str(figures), "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "run": run_dir, "figures": figures, "log": proc.stderr}


def _reference_logits(state_file: Path, files: list[str], border: int = 0) -> torch.Tensor:
    """Logits of a released checkpoint with open_clip's own preprocess, one image at a time."""
    model = create_classifier(PAPER_ARCH, 1000)
    model.load_state_dict(torch.load(state_file, weights_only=True))
    transform = open_clip.image_transform(224, is_train=False)
    images = []
    for f in files:
        with Image.open(f) as im:
            im = im.crop((border, border, im.width - border, im.height - border))
            images.append(transform(im))
    with torch.inference_mode():
        return model.eval()(torch.stack(images))


def test_every_model_and_recipe_is_evaluated_on_every_set(paper_run) -> None:
    acc = pd.read_csv(paper_run["run"] / "results" / "accuracy.csv")
    methods = ["LP init", "model_1", "model_2", *NAMES]
    assert sorted(acc["method"].unique()) == sorted(methods)
    sizes = {"heldout": 6, **SIZES}  # 2 held out per class of 3 train classes
    for method in methods:
        rows = acc[acc["method"] == method].set_index("set")
        assert tuple(rows.index) == SETS
        assert {s: int(rows.loc[s, "n"]) for s in SETS} == sizes
    assert acc["accuracy"].between(0, 100).all()
    # the stand-in models differ: not every method scores the same on ImageNet
    assert acc[acc["set"] == "ImageNet"]["accuracy"].nunique() > 1


def test_accuracies_match_open_clip_preprocessing_and_the_published_label_maps(paper_run) -> None:
    acc = pd.read_csv(paper_run["run"] / "results" / "accuracy.csv").set_index(["method", "set"])
    root = paper_run["root"]
    ckpt = root / "checkpoints" / "model_1.pt"
    val = sorted(artifact_path("imagenet-val", root).glob("*/*"))
    labels = torch.tensor([WNIDS.index(Path(f).parent.name) for f in val])
    pred = _reference_logits(ckpt, [str(f) for f in val]).argmax(1)
    assert acc.loc[("model_1", "ImageNet"), "accuracy"] == pytest.approx(
        100 * (pred == labels).float().mean().item()
    )
    # ObjectNet: uncropped (as published), class score = max over the mapped logits, squeegee dropped
    onet = artifact_path("objectnet-1.0", root) / "images"
    files = sorted(onet.glob("alarm_clock/*")) + sorted(onet.glob("banana/*"))
    logits = _reference_logits(ckpt, [str(f) for f in files], border=0)
    analog, digital, banana = (WNIDS.index(w) for w in ("n02708093", "n03196217", "n07753592"))
    scores = torch.stack([logits[:, [analog, digital]].max(1).values, logits[:, banana]], 1)
    truth = torch.tensor([0, 0, 1, 1])
    assert acc.loc[("model_1", "ObjectNet"), "accuracy"] == pytest.approx(
        100 * (scores.argmax(1) == truth).float().mean().item()
    )


def test_soups_never_lose_to_their_best_ingredient_on_held_out(paper_run) -> None:
    soups = paper_run["run"] / "soups"
    accs = json.loads((soups / "ingredient_val_accs.json").read_text())
    assert len(accs) == 3  # model_0..model_2: the spec's n_runs, not the 72
    for name in ("greedy_soup", "mms_c8", "mms_c15", "mms_c26"):
        meta = read_sidecar(soups / f"{name}.safetensors")
        assert meta["val_acc"] >= max(accs) - 1e-9, name  # Alg. 1 / Recipe 1 keep only gains
        assert set(meta["ingredients"]) <= {0, 1, 2}
    mms = read_sidecar(soups / "mms_c8.safetensors")
    assert mms["n_evals"] <= 2 * (3 + 1)  # two candidates, budget 3 each (+ the check of each)
    assert len(set(mms["weights"]) - {"_uncovered"}) == 8  # the paper's C8: every component
    live = read_sidecar(soups / "mms_c8+live.safetensors")
    assert len(set(live["weights"]) - {"_uncovered"}) == 3  # the ablation: 3 live components


def test_every_mms_row_records_the_optimizer_that_ran(paper_run) -> None:
    """NGOpt's choice depends on dimension and budget: each MMS row says what actually ran."""
    summary = pd.read_csv(paper_run["run"] / "soups" / "summary.csv").set_index("method")
    for name in [n for n in NAMES if n.startswith("MMS-")]:
        meta = read_sidecar(paper_run["run"] / "soups" / summary.loc[name, "file"])
        ran = [r["optimizer"] for r in meta["info"]["optimizers"]]
        assert ran and meta["info"]["params"]["optimizer"] == "NGOpt", name
        assert summary.loc[name, "optimizer"] == f"{ran[0]} ×{len(ran)}", name  # one kind here
        assert ran[0] == "Cobyla", name  # NGOpt's pick for 3 to 26 dimensions at budget 3


def test_figure2_and_table1_are_written_with_the_papers_values(paper_run) -> None:
    figures = paper_run["figures"]
    for name in ("figure2.png", "figure2.pdf", "table1.csv", "table1.md", "table1.tex"):
        assert (figures / name).stat().st_size > 0, name
    table = pd.read_csv(figures / "table1.csv")
    acc = pd.read_csv(paper_run["run"] / "results" / "accuracy.csv")
    row = table[table["method"] == "Uniform soup"].iloc[0]
    shifts = acc[(acc["method"] == "Uniform soup") & acc["set"].isin(SETS[2:])]["accuracy"]
    assert row["Avg OOD"] == pytest.approx(shifts.mean(), abs=0.01)
    assert "swapped" in (figures / "table1.md").read_text()  # the paper profile's label note
    timings = json.loads((paper_run["run"] / "timings.json").read_text())
    assert set(timings) == {"soups", "evaluate"}  # nothing fine-tuned: the released pool is used


# -- the profile spec and the paper profile's errors (no pipeline run) ----------------------------
def test_profile_spec_overrides_fields_and_refuses_mistakes() -> None:
    prof = get_profile(SPEC)
    assert (prof.n_runs, prof.mms_budget, prof.heldout_per_class) == (2, 3, 2)
    assert prof.arch == PAPER_ARCH and prof.dataset == "imagenet" and prof.name == SPEC
    assert get_profile("embedded:mms_budget=250").mms_budget == 250
    with pytest.raises(MMSoupError, match="'arch' cannot be overridden"):
        get_profile("paper:arch=RN50")
    with pytest.raises(MMSoupError, match="positive integer"):
        get_profile("paper:n_runs=-1")
    with pytest.raises(MMSoupError, match="model_0..model_71, no more"):
        get_profile("paper:n_runs=80")
    with pytest.raises(MMSoupError, match="Unknown profile 'papr'"):
        get_profile("papr:n_runs=2")


def test_released_pool_names_the_missing_checkpoints(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MMSOUP_DATA", str(tmp_path))
    assert [p.name for p in ingredient_paths(SPEC, tmp_path)] == [f"model_{i}.pt" for i in range(3)]
    assert len(ingredient_paths("paper", tmp_path)) == 72
    with pytest.raises(MMSoupError, match=r"3 of the 3 released checkpoints .* data fetch"):
        finetune_stage(SPEC, tmp_path / "run")


def test_verify_takes_profile_specs(tmp_path) -> None:
    from mmsoup.data.manifest import verify

    paper = verify(SPEC, tmp_path)
    models = [n for n in paper["name"] if n.startswith("model_")]
    assert models == ["model_0", "model_1", "model_2"] and "imagenet-a" in set(paper["name"])
    assert len(verify("paper", tmp_path)) == len(paper) + 69  # all 72 checkpoints
    assert set(verify("smoke", tmp_path)["name"]) == set(verify("embedded", tmp_path)["name"])
    with pytest.raises(MMSoupError, match="Unknown profile"):
        verify("tiny", tmp_path)


def test_figure2_from_soups_released_results_alone(tmp_path, monkeypatch) -> None:
    """No data, no GPU, no run: notebook 04 draws Soups' per-model results beside the papers'."""
    monkeypatch.setenv("MMSOUP_DATA", str(tmp_path))
    with pytest.raises(MMSoupError, match="data fetch individual_model_results"):
        figure2_stage("paper", tmp_path / "run", tmp_path / "figures")
    results = artifact_path("individual_model_results")
    results.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for k in range(4):
        accs = {s: float(rng.uniform(0.3, 0.8)) for s in ("ImageNet2p", *SETS[1:])}
        lines.append(json.dumps({"model_name": f"model_{k}", **accs}))
    results.write_text("\n".join(lines) + "\n")
    paths = figure2_stage("paper", tmp_path / "run", tmp_path / "figures")
    assert [p.name for p in paths] == ["figure2.png", "figure2.pdf"]
    assert all(p.stat().st_size > 0 for p in paths)
