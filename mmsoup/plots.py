"""Every plot: MMS Fig. 2 (Soups Fig. 1) from a run's results, and the notebooks' sweep and mixing-weight plots.

Figure 2 draws on a backend-free matplotlib Figure, so a notebook's pyplot backend and style stay
as they are; each recipe is drawn with its style in `mmsoup.recipes`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mmsoup.checkpoints import read_sidecar
from mmsoup.errors import MMSoupError
from mmsoup.io import atomic_path
from mmsoup.papers import PAPER_SHIFTS
from mmsoup.recipes import PALETTE, SHOWN, Style, slug
from mmsoup.results import HELDOUT_SET, LP_INIT, by_set, check_acc, method_kinds, ranked_individuals
from mmsoup.table1 import AVG_OOD, BEST, SECOND

# label -> (marker, colour, size in pt^2, z-order); the soups sit above the cloud of models.
_STYLES: dict[str, Style] = {
    "Individual fine-tuned models": ("o", "#a0a0a0", 22, 2),
    BEST + " (held-out)": ("o", "#404040", 48, 3),
    LP_INIT: ("s", "#000000", 48, 4),
    **{r.name: r.style for r in SHOWN},
}
_EXTRA_MARKERS = ("d", ">", "8", "H", "1", "2", "3", "4")


def _points(acc: pd.DataFrame, id_set: str, shifts: Sequence[str]) -> pd.DataFrame:
    """One point per method: x = ID top-1, y = Avg-OOD top-1, with its legend label (MMS Fig. 2)."""
    acc = check_acc(acc, id_set, shifts)
    kinds = method_kinds(acc)
    wide = by_set(acc, [id_set, *shifts])
    y = wide[list(shifts)].mean(axis=1, skipna=False)
    ranked = ranked_individuals(acc) if HELDOUT_SET in set(acc["set"]) else []
    best = ranked[0] if ranked else None
    labels = []
    for m in wide.index:
        if m == best:
            labels.append(BEST + " (held-out)")
        elif kinds[m] == "individual":
            labels.append("Individual fine-tuned models")
        elif kinds[m] == "init":
            labels.append(LP_INIT)
        else:
            labels.append(m)
    pts = pd.DataFrame({"label": labels, "x": wide[id_set].to_numpy(), "y": y.to_numpy()})
    return pts.dropna(subset=["x", "y"])


def _reference_points(reference: pd.DataFrame, ref_id: str) -> pd.DataFrame:
    """Points of the papers' values: a Table 1-shaped frame (like PAPER_TABLE1) or the long schema."""
    if {"method", "set", "accuracy"} <= set(reference.columns):
        sets = set(reference["set"].astype(str))
        shifts = [s for s in PAPER_SHIFTS if s in sets] or sorted(sets - {ref_id, HELDOUT_SET})
        return _points(reference, ref_id, shifts)
    if ref_id not in reference.columns or AVG_OOD not in reference.columns:
        raise MMSoupError(
            f"The reference table needs an {ref_id!r} column and an {AVG_OOD!r} column (as PAPER_TABLE1 has)."
        )
    labels = []
    for label in reference.index.astype(str):
        if label == BEST:
            labels.append(BEST + " (held-out)")
        elif label == SECOND or label.startswith("model_"):
            labels.append("Individual fine-tuned models")
        else:
            labels.append(label)
    pts = pd.DataFrame(
        {
            "label": labels,
            "x": pd.to_numeric(reference[ref_id], errors="coerce").to_numpy(),
            "y": pd.to_numeric(reference[AVG_OOD], errors="coerce").to_numpy(),
        }
    )
    return pts.dropna(subset=["x", "y"])


def _style(label: str, extras: dict[str, Style]):
    """Marker, colour, size and z-order for a legend label; unknown methods get spare markers."""
    if label in _STYLES:
        return _STYLES[label]
    if label.startswith("WiSE-FT"):
        return _STYLES["WiSE-FT"]
    if label not in extras:
        i = len(extras)
        colours = list(PALETTE.values())
        extras[label] = (_EXTRA_MARKERS[i % len(_EXTRA_MARKERS)], colours[i % len(colours)], 75, 5)
    return extras[label]


def _scatter(ax, pts: pd.DataFrame, hollow: bool, extras: dict) -> None:
    """Draw the points of one panel, filled (this run) or hollow (the papers' numbers)."""
    for label, grp in pts.groupby("label", sort=False):
        marker, colour, size, z = _style(str(label), extras)
        kw = dict(marker=marker, s=size, zorder=z, label=label)
        if hollow:  # larger and on top, so a reported value rings our point when they agree
            kw |= dict(facecolors="none", edgecolors=colour, linewidths=1.4)
            kw |= dict(s=size * 1.8, zorder=z + 10)
        else:
            kw |= dict(color=colour, edgecolors="white", linewidths=0.6)
        if str(label) == "Individual fine-tuned models":
            kw["alpha"] = 0.85
        ax.scatter(grp["x"], grp["y"], **kw)


def _legend_order(label: str) -> tuple[int, str]:
    """Legend entries in Table 1's order: models first, then the soups and ensembles."""
    order = list(_STYLES)
    return (order.index(label), "") if label in order else (len(order), label)


def figure2(
    acc: pd.DataFrame,
    id_set: str,
    shifts: Sequence[str],
    out_dir: str | os.PathLike,
    reference: pd.DataFrame | None = None,
    title: str | None = None,
) -> list[Path]:
    """MMS Fig. 2 / Soups Fig. 1: ID top-1 vs Avg-OOD top-1 for every model, soup and ensemble.

    Writes `figure2.png` (200 dpi) and `figure2.pdf` atomically. With `reference` (e.g.
    PAPER_TABLE1, or the papers' per-model results in the long schema) on the same ID set, the
    papers' values are drawn on our axes as hollow markers.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    pts = _points(acc, id_set, shifts)
    if pts.empty:
        raise MMSoupError("No method has both ID and every shift accuracy; nothing to plot.")
    ref_pts = None
    if reference is not None:
        if id_set not in reference.columns and id_set not in set(reference.get("set", [])):
            raise MMSoupError(
                f"The reference has no {id_set} accuracy; the papers' values are drawn only on the same ID set."
            )
        ref_pts = _reference_points(reference, id_set)
        if ref_pts.empty:
            raise MMSoupError("The reference has no point with both ID and Avg OOD accuracy.")
    rc = {
        "font.size": 11,
        "axes.titlesize": 12,
        "axes.labelsize": 11,
        "legend.fontsize": 10,
        "xtick.labelsize": 10,
        "ytick.labelsize": 10,
        "axes.grid": True,
        "grid.color": "#e6e6e6",
        "axes.edgecolor": "#555555",
        "axes.spines.top": False,
        "axes.spines.right": False,
        "pdf.fonttype": 42,  # TrueType in the PDF, so the text stays editable and searchable
    }
    import matplotlib as mpl

    # the papers' values as hollow markers on our axes, so each reported point sits beside ours
    with mpl.rc_context(
        rc
    ):  # no global state: the caller's pyplot backend and style stay as they are
        fig = Figure(figsize=(7.2, 6.2), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        extras: dict = {}
        _scatter(ax, pts, hollow=False, extras=extras)
        ax.set_xlabel(f"ID top-1 accuracy on {id_set} (%)")
        ax.set_ylabel(f"Avg OOD top-1 accuracy (%)\nmean over {len(shifts)} shifted test sets")
        legend_title = None
        if ref_pts is not None:
            _scatter(ax, ref_pts, hollow=True, extras=extras)
            legend_title = "filled: this run    hollow: reported in the papers"
        ax.xaxis.set_major_locator(MaxNLocator(7))
        ax.yaxis.set_major_locator(MaxNLocator(7))
        ax.margins(0.06)
        # One legend below the axes, so it never covers a point; a label drawn both filled and
        # hollow shows its filled (this run's) handle.
        handles: dict[str, object] = {}
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
        labels = sorted(handles, key=_legend_order)
        fig.legend(
            [handles[k] for k in labels],
            labels,
            loc="outside lower center",
            ncols=min(3, len(labels)),
            frameon=False,
            title=legend_title,
            title_fontsize=10,
        )
        if title:
            fig.suptitle(title)
        out = Path(out_dir)
        paths = [out / "figure2.png", out / "figure2.pdf"]
        with atomic_path(paths[0]) as tmp:
            fig.savefig(tmp, format="png", dpi=200, metadata={"Software": None})
        with atomic_path(paths[1]) as tmp:  # no creation date: the same results give the same file
            fig.savefig(tmp, format="pdf", metadata={"CreationDate": None})
    return paths


def plot_sweep(runs: pd.DataFrame):
    """Held-out accuracy of each run against its learning rate (notebook 01)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    if "val_acc" not in runs or "lr" not in runs:  # released pool without Soups' files fetched
        ax.text(
            0.5,
            0.5,
            "no learning rates or held-out accuracies to plot yet\n"
            "(paper profile: `mmsoup data fetch hparam_info individual_model_results`)",
            ha="center",
            va="center",
            fontsize=8,
            transform=ax.transAxes,
        )
        ax.set_axis_off()
        return fig
    ft = runs.dropna(subset=["lr", "val_acc"])
    ax.scatter(ft["lr"], 100 * ft["val_acc"], c="#4c72b0", label="fine-tuned runs")
    for _, r in ft.iterrows():
        ax.annotate(
            r["name"].replace("model_", ""),
            (r["lr"], 100 * r["val_acc"]),
            fontsize=7,
            xytext=(3, 2),
            textcoords="offset points",
        )
    if runs["val_acc"].notna().any() and "augment" in runs:
        lp = runs[runs["augment"] == "LP init"]
        if len(lp) and lp["val_acc"].notna().all():
            ax.axhline(100 * lp["val_acc"].iloc[0], color="grey", ls="--", label="LP init")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("held-out top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_mixing_weights(run_dir: str | os.PathLike, method: str = "MMS-C26"):
    """Heat map of the per-component coefficients of each ingredient in an MMS soup (notebook 02)."""
    import matplotlib.pyplot as plt

    file = Path(run_dir) / "soups" / f"{slug(method)}.safetensors"
    meta = read_sidecar(file)
    weights = pd.DataFrame(meta["weights"]).T
    weights.columns = [f"model_{i}" for i in weights.columns]
    weights = weights.loc[:, (weights > 1e-6).any()]
    weights.index = [i.removeprefix("model.") for i in weights.index]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * weights.shape[1], 0.3 * len(weights) + 1.2))
    im = ax.imshow(weights.values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(weights.shape[1]), weights.columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(weights)), weights.index, fontsize=7)
    ax.set_title(f"{method}: share of each ingredient per component", fontsize=9)
    fig.colorbar(im, ax=ax, label="coefficient")
    fig.tight_layout()
    return fig
