"""Every plot: MMS Fig. 2 (Soups Fig. 1) from a run's results, the notebooks' sweep and
mixing-weight plots, and the analyses of Soups §3.2 and its appendices (notebook 07).

Figures draw on backend-free matplotlib Figures, so a notebook's pyplot backend and style stay as
they are; each recipe is drawn with its style in `mmsoup.recipes`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

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


def _shared_offsets(pts: pd.DataFrame, near: float = 0.012) -> dict[int, tuple[float, float]]:
    """Offsets in points for soups that would hide each other: those within `near` of the axes'
    span of one another (e.g. an MMS soup that kept the greedy soup's models at λ = ½), spread on
    a circle around the cluster, each with a leader line to its own point. Individual models keep
    their place."""
    soups = pts[pts["label"] != "Individual fine-tuned models"]
    xr = max(float(pts["x"].max() - pts["x"].min()), 1e-9)
    yr = max(float(pts["y"].max() - pts["y"].min()), 1e-9)
    clusters: list[list[int]] = []
    for i in soups.index:  # single linkage: join every cluster with a member near i
        near_i = [
            c
            for c in clusters
            if any(
                abs(pts.at[i, "x"] - pts.at[j, "x"]) <= near * xr
                and abs(pts.at[i, "y"] - pts.at[j, "y"]) <= near * yr
                for j in c
            )
        ]
        merged = [i] + [j for c in near_i for j in c]
        clusters = [c for c in clusters if c not in near_i] + [merged]
    out: dict[int, tuple[float, float]] = {}
    for c in clusters:
        if len(c) < 2:
            continue
        radius = max(13.0, 3.2 * len(c))
        for k, i in enumerate(sorted(c)):
            a = math.pi / 2 + 2 * math.pi * k / len(c)
            out[i] = (radius * math.cos(a), radius * math.sin(a))
    return out


def _scatter(ax, pts: pd.DataFrame, hollow: bool, extras: dict, offsets=None) -> None:
    """Draw the points of one panel, filled (this run) or hollow (the papers' numbers).

    `offsets` (index -> (dx, dy) in points) moves markers that would hide each other."""
    from matplotlib.transforms import offset_copy

    offsets = offsets or {}
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
        moved = [i for i in grp.index if i in offsets]
        rest = grp.drop(index=moved)
        if len(rest):
            ax.scatter(rest["x"], rest["y"], **kw)
        for i in moved:
            dx, dy = offsets[i]
            x, y = grp.at[i, "x"], grp.at[i, "y"]
            ax.annotate("", (x, y), xytext=(dx, dy), textcoords="offset points", zorder=1,
                        arrowprops=dict(arrowstyle="-", color="#777777", lw=0.6,
                                        shrinkA=0, shrinkB=0))  # fmt: skip
            tr = offset_copy(ax.transData, fig=ax.figure, x=dx, y=dy, units="points")
            ax.scatter([x], [y], transform=tr, **kw)
            kw.pop("label", None)  # one legend entry per label


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
        offsets = _shared_offsets(pts)
        _scatter(ax, pts, hollow=False, extras=extras, offsets=offsets)
        for i in sorted(offsets):  # where each moved marker really is
            ax.scatter(
                [pts.at[i, "x"]], [pts.at[i, "y"]], marker=".", s=8, color="black", zorder=20
            )
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
        if offsets:  # say why some markers sit on spokes
            ax.set_title("soups at (nearly) one point are spread around it; a line leads to each "
                         "one's point (black dot)", fontsize=8, loc="left", color="#555555")  # fmt: skip
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


# =============================================================================================
# Why soups work (notebook 07): Soups §3.2, Figs. 2, 3, 4, B.1 and D.1, from mmsoup.analysis
# =============================================================================================

_CYCLE = [  # seaborn "colorblind", in its order
    PALETTE[c]
    for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "grey", "yellow", "cyan")
]


def _figure(width: float, height: float, ncols: int = 1):
    """A backend-free Figure (its own Agg canvas) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, color="#e6e6e6")
        ax.set_axisbelow(True)
    return fig, axes


def _panels(n: int, width: float, height: float, ncols: int = 3):
    """A Figure of n panels, at most `ncols` to a row (page width: ncols x `width` inches), and
    the used axes in reading order; spare axes of the last row are hidden."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    n = max(1, n)
    cols = min(ncols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_axis_off()
    for ax in axes[:n]:
        ax.grid(True, color="#e6e6e6")
        ax.set_axisbelow(True)
    return fig, axes[:n]


def _lr_colours(ax, fig, values: pd.Series, **scatter):
    """Scatter coloured by log10 learning rate (cividis), with a colour bar."""
    sc = ax.scatter(c=np.log10(values.to_numpy(float)), cmap="cividis", **scatter)
    fig.colorbar(sc, ax=ax, label="log10 learning rate (pair: geometric mean)")
    return sc


def plot_error_landscape(landscape: pd.DataFrame, title: str | None = None) -> Figure:
    """Held-out error on the plane through θ_0, θ_a, θ_b with the models and their average (Soups Fig. 2)."""
    grid = landscape[landscape["point"] == "grid"]
    z = grid.pivot(index="y", columns="x", values="error")
    span = (grid["y"].max() - grid["y"].min()) / max(grid["x"].max() - grid["x"].min(), 1e-12)
    fig, (ax,) = _figure(6.0, min(6.0, max(2.8, 4.9 * span + 1.0)))  # the plane's own aspect
    ax.grid(False)
    cs = ax.contourf(z.columns, z.index, z.to_numpy(), levels=12, cmap="viridis")
    ax.contour(z.columns, z.index, z.to_numpy(), levels=cs.levels, colors="white", linewidths=0.4)
    cax = ax.inset_axes([1.04, 0.0, 0.045, 1.0])  # follows the axes' box: as tall as the plot
    fig.colorbar(cs, cax=cax, label="held-out error (%)")
    style = {
        "θ_0": ("s", "black"),
        "θ_a": ("o", PALETTE["orange"]),
        "θ_b": ("o", PALETTE["orange"]),
        "average": ("*", PALETTE["red"]),
    }
    middle = 0.5 * (grid["x"].min() + grid["x"].max())
    for _, r in landscape[landscape["point"] != "grid"].iterrows():
        marker, colour = style.get(r["point"], ("D", "white"))
        size = 260 if marker == "*" else 90
        ax.scatter(
            r["x"], r["y"], marker=marker, s=size, color=colour, edgecolors="white", zorder=3
        )
        ax.annotate(
            f"{r['point']}  {r['error']:.1f}%",
            (r["x"], r["y"]),
            xytext=(-8 if r["x"] > middle else 8, 7),  # toward the centre: inside the axes
            textcoords="offset points",
            ha="right" if r["x"] > middle else "left",
            color="white",
            fontsize=9,
            weight="bold",
        )
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("along θ_a - θ_0 (parameter distance)")
    ax.set_ylabel("orthogonal, toward θ_b")
    ax.set_title(title or "Held-out error on the plane through θ_0, θ_a, θ_b", fontsize=10)
    return fig


def plot_interpolation_advantage(pairs: pd.DataFrame) -> Figure:
    """Interpolation advantage of each pair against the angle between its updates (Soups Fig. 3)."""
    fig, (ax,) = _figure(6.4, 4.2)
    kw = {"x": pairs["angle"], "y": pairs["advantage"], "s": 36, "edgecolors": "white", "zorder": 3}
    if "pair_lr" in pairs:
        _lr_colours(ax, fig, pairs["pair_lr"], **kw)
    else:
        ax.scatter(color=PALETTE["blue"], **kw)
    ax.axhline(0, color="#555555", linewidth=0.8)
    rho = pairs["angle"].corr(pairs["advantage"], method="spearman")
    ax.set_xlabel("angle between θ_a - θ_0 and θ_b - θ_0 (degrees)")
    ax.set_ylabel("interpolation advantage (points)\nAcc(½θ_a+½θ_b) - mean endpoint Acc")
    ax.set_title(f"{len(pairs)} pairs, Spearman ρ = {rho:.2f}", fontsize=10)
    return fig


def plot_ensemble_vs_soup(pairs: pd.DataFrame) -> Figure:
    """Ensemble against soup accuracy of each pair, and their gap by learning rate (Soups Fig. 4)."""
    has_lr = "pair_lr" in pairs
    fig, axes = _figure(9.6 if has_lr else 5.0, 4.2, ncols=2 if has_lr else 1)
    ax = axes[0]
    kw = {"x": pairs["soup"], "y": pairs["ensemble"], "s": 36, "edgecolors": "white", "zorder": 3}
    if has_lr:
        _lr_colours(ax, fig, pairs["pair_lr"], **kw)
    else:
        ax.scatter(color=PALETTE["blue"], **kw)
    lo = float(min(pairs["soup"].min(), pairs["ensemble"].min())) - 0.5
    hi = float(max(pairs["soup"].max(), pairs["ensemble"].max())) + 0.5
    ax.plot([lo, hi], [lo, hi], color="#555555", linewidth=0.8, label="ensemble = soup")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("soup of the pair: held-out acc (%)")
    ax.set_ylabel("ensemble of the pair: held-out acc (%)")
    ax.legend(loc="upper left", frameon=False, fontsize=9)
    if has_lr:
        ax = axes[1]
        ax.scatter(
            pairs["pair_lr"],
            pairs["ensemble"] - pairs["soup"],
            s=36,
            color=PALETTE["blue"],
            edgecolors="white",
            zorder=3,
        )
        ax.axhline(0, color="#555555", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate of the pair (geometric mean)")
        ax.set_ylabel("ensemble - soup (points)")
    return fig


def plot_random_order(curves: pd.DataFrame) -> Figure:
    """Best model, uniform and greedy soup as models arrive in random order (Soups Fig. B.1)."""
    panels = [("", "held-out")] + ([("_test", "test")] if "greedy_test" in curves else [])
    fig, axes = _figure(4.7 * len(panels), 4.0, ncols=len(panels))
    lines = (
        ("best", "best individual (by held-out)", PALETTE["grey"]),
        ("uniform", "uniform soup", PALETTE["blue"]),
        ("greedy", "greedy soup", PALETTE["orange"]),
    )
    for ax, (suffix, label) in zip(axes, panels):
        n = curves["seed"].nunique()
        for col, name, colour in lines:
            for _, seed in curves.groupby("seed") if n > 1 else ():  # each order, thin
                ax.plot(seed["k"], seed[col + suffix], color=colour, alpha=0.35, linewidth=0.8)
            mean = curves.groupby("k")[col + suffix].mean()
            ax.plot(
                mean.index,
                mean.to_numpy(),
                color=colour,
                linewidth=2.2,
                marker="o",
                ms=3,
                label=name,
            )
        ax.set_xlabel("models in the pool (random order)")
        ax.set_ylabel(f"{label} acc (%)")
        title = f"mean of {n} random orders (thin: each)" if n > 1 else "one random order"
        ax.set_title(f"{label}: {title}", fontsize=10)
    axes[0].legend(frameon=False, fontsize=9, loc="lower right")
    return fig


def plot_wise_curves(wise: pd.DataFrame, id_label: str = "ID") -> Figure:
    """WiSE-FT curves from θ_0 to each model in (ID, OOD), and the soups (Soups Fig. D.1)."""
    fig, (ax,) = _figure(6.4, 5.0)
    curves = wise[wise["kind"] == "WiSE-FT"]
    for i, (name, c) in enumerate(curves.groupby("curve", sort=False)):
        c = c.sort_values("alpha")
        colour = _CYCLE[(i + 2) % len(_CYCLE)]
        ax.plot(
            c["ID"],
            c["OOD"],
            color=colour,
            marker="o",
            ms=4,
            linewidth=1.4,
            label=f"WiSE-FT → {name}",
        )
        end = c.iloc[-1]
        ax.scatter(end["ID"], end["OOD"], s=60, color=colour, edgecolors="black", zorder=3)
    init = curves[curves["alpha"] == 0.0].iloc[:1]
    ax.scatter(
        init["ID"], init["OOD"], marker="s", s=70, color="black", zorder=4, label="θ_0 (LP init)"
    )
    markers = {
        "Uniform soup": ("D", PALETTE["blue"]),
        "Greedy soup": ("*", PALETTE["orange"]),
    }
    for _, r in wise[wise["kind"] == "soup"].iterrows():
        m, colour = markers.get(r["curve"], ("P", PALETTE["red"]))
        ax.scatter(
            r["ID"], r["OOD"], marker=m, s=220 if m == "*" else 90, color=colour,
            edgecolors="black", zorder=5, label=r["curve"],
        )  # fmt: skip
    ax.set_xlabel(f"{id_label} acc (%)")
    ax.set_ylabel("avg OOD acc (%)")
    alphas = sorted(a for a in curves["alpha"].unique() if not math.isnan(a))
    ax.set_title(f"WiSE-FT, α ∈ {{{', '.join(f'{a:g}' for a in alphas)}}}", fontsize=10)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    return fig


# =============================================================================================
# The chapters (notebooks 01, 02, 03, 08): the sweep, what each soup recipe decided, the data,
# accuracy per set, and the replicate study; tables from mmsoup.analysis / mmsoup.replicates
# =============================================================================================

DECISION_COLOURS = {  # colourblind palette: kept / optimised but not kept / not optimised
    "start": "#000000",
    "accepted": PALETTE["green"],
    "rejected": PALETTE["red"],
    "skipped": PALETTE["grey"],
}


def _message(fig: Figure, ax, text: str) -> Figure:
    """An empty panel that says why there is nothing to draw."""
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, transform=ax.transAxes, wrap=True)
    ax.set_axis_off()
    return fig


def plot_sweep_runs(runs: pd.DataFrame) -> Figure:
    """Held-out accuracy of each run against its learning rate, by augmentation; the LP init (notebook 01)."""
    fig, (ax,) = _figure(6.4, 4.0)
    if "val_acc" not in runs or "lr" not in runs or runs["lr"].isna().all():
        return _message(fig, ax, "no learning rates or held-out accuracies to plot yet")
    ft = runs.dropna(subset=["lr", "val_acc"])
    augments = ft["augment"].fillna("?") if "augment" in ft else pd.Series("runs", index=ft.index)
    for i, (aug, g) in enumerate(ft.groupby(augments, sort=True)):
        ax.scatter(g["lr"], 100 * g["val_acc"], s=46, color=_CYCLE[i % len(_CYCLE)],
                   edgecolors="white", zorder=3, label=str(aug))  # fmt: skip
        for _, r in g.iterrows():
            ax.annotate(str(r["name"]).replace("model_", ""), (r["lr"], 100 * r["val_acc"]),
                        fontsize=7, xytext=(3, 2), textcoords="offset points")  # fmt: skip
    lp = runs[runs.get("augment", pd.Series(dtype=str)) == "LP init"]
    if len(lp) and lp["val_acc"].notna().all():
        ax.axhline(
            100 * lp["val_acc"].iloc[0], color="black", ls="--", lw=1, label="LP init (model_0)"
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("held-out top-1 (%)")
    ax.legend(frameon=False, fontsize=8, title="augmentation", title_fontsize=8)
    return fig


def plot_lp_init(val_acc_by_c: dict[str, float], chosen: float | None = None) -> Figure:
    """Held-out accuracy of the linear probe against its inverse regularisation C (notebook 01)."""
    fig, (ax,) = _figure(4.6, 3.2)
    cs = np.array([float(c) for c in val_acc_by_c])
    accs = 100 * np.array(list(val_acc_by_c.values()), dtype=float)
    ax.plot(cs, accs, marker="o", color=PALETTE["blue"])
    if chosen is not None:
        ax.axvline(chosen, color="black", ls="--", lw=1, label=f"chosen C = {chosen:g}")
        ax.legend(frameon=False, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("C (inverse L2 regularisation of the probe)")
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title("the LP init: a linear probe on frozen features", fontsize=10)
    return fig


def plot_training_curves(
    losses: pd.DataFrame,
    names: Sequence[str] | None = None,
    labels: dict[str, str] | None = None,
) -> Figure:
    """Training loss against step for a few sweep runs (notebook 01; from analysis.training_losses).

    `labels` names each run in the legend (e.g. 'model_9: best on held-out, 95.60 %')."""
    fig, (ax,) = _figure(5.6, 3.6)
    if losses.empty:
        return _message(fig, ax, "no training losses were recorded for this sweep")
    names = list(names) if names is not None else sorted(losses["name"].unique())
    labels = labels or {}
    for i, name in enumerate(names):
        g = losses[losses["name"] == name]
        ax.plot(g["step"], g["loss"], marker="o", ms=3, color=_CYCLE[i % len(_CYCLE)],
                label=labels.get(name, name))  # fmt: skip
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss of one mini-batch\n(soft-target CE)")
    ax.set_title("logged every 50 steps: one batch each, so noisy", fontsize=9)
    ax.legend(frameon=False, fontsize=8)
    return fig


def plot_greedy_path(path: pd.DataFrame, title: str = "Greedy soup") -> Figure:
    """Each candidate's held-out accuracy (added to the soup) against the best so far (Soups Recipe 1)."""
    fig, (ax,) = _figure(max(5.0, 0.5 * len(path) + 2.5), 3.8)
    x = path["step"].to_numpy()
    best_after = np.maximum.accumulate(
        np.where(path["decision"] == "rejected", -np.inf, path["acc"])
    )
    ax.step(x, best_after, where="post", color="black", lw=1.2, label="best so far (the soup)")
    ax.scatter(x, path["own_acc"], marker="_", s=160, color="#949494", zorder=3,
               label="candidate alone")  # fmt: skip
    for decision, g in path.groupby("decision", sort=False):
        ax.scatter(g["step"], g["acc"], s=60, color=DECISION_COLOURS[decision], edgecolors="white",
                   zorder=4, label="best ingredient" if decision == "start" else f"with it: {decision}")  # fmt: skip
    ax.set_xticks(x, [f"{s}\nmodel_{c}" for s, c in zip(x, path["candidate"])], fontsize=7)
    ax.set_xlabel("step (candidates best-first by their own held-out accuracy)")
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=8, loc="best")
    return fig


def plot_mms_decisions(decisions: dict[str, pd.DataFrame]) -> Figure:
    """Per MMS candidate: the τ test (Ψ̃ vs τ·acc(Ψ)) and the optimised accuracy, one panel per recipe (MMS Alg. 1)."""
    fig, axes = _panels(len(decisions), 3.3, 3.3)
    for ax, (name, d) in zip(axes, decisions.items()):
        x = d["step"].to_numpy()
        # the bars each candidate faces: acc(Ψ) before it (accept) and τ·acc(Ψ) (optimise at all)
        ax.hlines(d["psi_acc"], x - 0.42, x + 0.42, color="black", lw=1.4, label="acc(Ψ) before it")
        ax.hlines(d["threshold"], x - 0.42, x + 0.42, color="black", lw=0.9, ls=":",
                  label="τ·acc(Ψ)")  # fmt: skip
        ax.scatter(x, d["approx_acc"], marker="o", s=40, facecolors="none",
                   edgecolors=[DECISION_COLOURS[v] for v in d["decision"]], linewidths=1.3,
                   zorder=3, label="τ test: the average at λ0")  # fmt: skip
        opt = d[d["decision"] != "skipped"]
        ax.scatter(opt["step"], opt["best_acc"], marker="D", s=46,
                   color=[DECISION_COLOURS[v] for v in opt["decision"]], edgecolors="white",
                   zorder=4, label="best λ* found")  # fmt: skip
        counts = d["decision"].value_counts()
        summary = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("accepted", "rejected", "skipped"))
        ax.set_title(f"{name}\n{summary}", fontsize=9)
        ax.set_xticks(x, [f"model_{c}" for c in d["candidate"]], rotation=90, fontsize=7)
        ax.set_xlabel("candidate (best-first)", fontsize=8)
        ax.set_ylabel("held-out top-1 (%)", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    for k in ("accepted", "rejected", "skipped"):
        handles.append(axes[0].scatter([], [], color=DECISION_COLOURS[k], s=30))
        labels.append(k)
    fig.legend(handles, labels, loc="outside lower center", ncols=4, frameon=False, fontsize=8)
    return fig


def plot_mms_traces(traces: dict[str, pd.DataFrame], decisions: dict[str, pd.DataFrame]) -> Figure:
    """The optimizer's held-out accuracy per evaluation of each optimised candidate, one panel per recipe."""
    fig, axes = _panels(len(traces), 3.3, 3.2)
    for ax, (name, t) in zip(axes, traces.items()):
        d = decisions[name].set_index("candidate")
        optimised = [c for c in d.index if d.loc[c, "decision"] != "skipped"]
        if not optimised:
            _message(
                fig, ax, f"{name}: every candidate was skipped by the τ test;\nno λ was searched"
            )
            continue
        for c in optimised:
            g = t[t["candidate"] == c]
            colour = DECISION_COLOURS[d.loc[c, "decision"]]
            ax.plot(g["k"], g["acc"], color=colour, lw=0.8, alpha=0.6)
            ax.plot(g["k"], np.maximum.accumulate(g["acc"].to_numpy()), color=colour, lw=1.8,
                    label=f"model_{c} ({d.loc[c, 'decision']})")  # fmt: skip
            ax.axhline(d.loc[c, "psi_acc"], color=colour, ls=":", lw=1)
        ax.set_title(f"{name} (dotted: acc(Ψ))", fontsize=9)
        ax.set_xlabel("evaluation (0: every λ at λ0)", fontsize=8)
        ax.set_ylabel("held-out top-1 (%)", fontsize=8)
        ax.legend(frameon=False, fontsize=7)
    fig.suptitle("thin: each evaluation; thick: best so far", fontsize=9)
    return fig


def plot_mms_lambdas(lambdas: dict[str, pd.DataFrame]) -> Figure:
    """λ* per component of each accepted step, one heat map per recipe (1: keep Ψ, 0: take θ_i)."""
    rows = max((len(v) for v in lambdas.values()), default=1)
    fig, axes = _panels(len(lambdas), 3.1, 0.2 * rows + 1.3)
    im = None
    for ax, (name, lam) in zip(axes, lambdas.items()):
        ax.grid(False)
        if lam.shape[1] == 0:
            _message(fig, ax, f"{name}:\nno accepted step")
            continue
        im = ax.imshow(lam.to_numpy(float), vmin=0, vmax=1, cmap="cividis", aspect="auto")
        ax.set_xticks(range(lam.shape[1]), lam.columns, fontsize=8)
        ax.set_yticks(
            range(len(lam)), [str(c).removeprefix("model.") for c in lam.index], fontsize=6
        )
        for (i, j), v in np.ndenumerate(lam.to_numpy(float)):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if v < 0.5 else "black")  # fmt: skip
        ax.set_title(f"{name}: λ* per accepted step", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=list(axes), label="λ*: share of Ψ kept", shrink=0.6)
    return fig


def plot_soup_coefficients(weights: dict[str, Sequence[float]], title: str) -> Figure:
    """Each ingredient's coefficient in each component of a soup (rows components, columns models)."""
    w = pd.DataFrame(weights).T
    w.columns = [f"model_{i}" for i in w.columns]
    w = w.loc[:, (w > 1e-6).any()]
    fig, (ax,) = _figure(1.6 + 0.55 * w.shape[1], 0.22 * len(w) + 1.6)
    ax.grid(False)
    im = ax.imshow(w.to_numpy(float), vmin=0, vmax=max(1e-6, float(w.to_numpy().max())),
                   cmap="viridis", aspect="auto")  # fmt: skip
    ax.set_xticks(range(w.shape[1]), w.columns, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(w)), [str(i).removeprefix("model.") for i in w.index], fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="coefficient (each row sums to 1)")
    return fig


def plot_learned_soup_loss(info: dict) -> Figure:
    """The learned soup's held-out cross-entropy per training step (Soups App. I)."""
    fig, (ax,) = _figure(5.0, 3.2)
    steps = pd.DataFrame(info.get("steps", []))
    if steps.empty:
        return _message(fig, ax, "no training steps recorded")
    ax.plot(np.arange(len(steps)), steps["loss"], color=PALETTE["green"], marker="o", ms=2)
    ax.set_xlabel("step (all epochs)")
    ax.set_ylabel("held-out cross-entropy")
    ax.set_title("learned soup: training the mixing coefficients", fontsize=10)
    return fig


def plot_wise_alphas(alphas: dict[str, float], chosen: float) -> Figure:
    """WiSE-FT's held-out accuracy against α (0: the LP init, 1: the fine-tuned model)."""
    fig, (ax,) = _figure(4.6, 3.2)
    a = np.array([float(k) for k in alphas])
    ax.plot(
        a, 100 * np.array(list(alphas.values()), dtype=float), marker="o", color=PALETTE["olive"]
    )
    ax.axvline(chosen, color="black", ls="--", lw=1, label=f"chosen α = {chosen:g}")
    ax.set_xlabel("α")
    ax.set_ylabel("held-out top-1 (%)")
    ax.legend(frameon=False, fontsize=8)
    return fig


def _display(image) -> np.ndarray:
    """(C, H, W) or (H, W), uint8 or normalised float -> (H, W[, 3]) in [0, 1] for imshow."""
    x = np.asarray(image, dtype=np.float64)
    if x.ndim == 3:
        x = x[0] if np.allclose(x, x[:1]) else np.moveaxis(x, 0, -1)  # grey stored as 3 channels
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def plot_example_images(examples: dict, class_names: Sequence[str] | None = None) -> Figure:
    """A grid of example images: one row per set, each with its label (notebook 03)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    per = max(len(labels) for _, labels in examples.values())
    fig = Figure(figsize=(1.15 * per + 1.4, 1.3 * len(examples)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(examples), per, squeeze=False)
    for row, (name, (images, labels)) in zip(axes, examples.items()):
        for j, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(labels):
                ax.set_axis_off()
                continue
            img = _display(images[j])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            y = int(labels[j])
            ax.set_title(class_names[y] if class_names else f"label {y}", fontsize=7, pad=2)
        row[0].set_ylabel(name, fontsize=9, rotation=0, ha="right", va="center")
    return fig


def plot_accuracy_by_set(acc: pd.DataFrame, id_set: str, shifts: Sequence[str]) -> Figure:
    """Top-1 of every method (rows) on every set (columns) with the Avg OOD column, annotated."""
    wide = by_set(acc, ["heldout" if HELDOUT_SET in set(acc["set"]) else id_set, id_set, *shifts])
    wide = wide.loc[:, ~wide.columns.duplicated()]
    wide[AVG_OOD] = wide[list(shifts)].mean(axis=1)
    fig, (ax,) = _figure(min(9.5, 0.9 * wide.shape[1] + 2.4), 0.28 * len(wide) + 1.4)
    ax.grid(False)
    # each column on its own scale: a column's best and worst methods stand out
    z = (wide - wide.min()) / (wide.max() - wide.min()).replace(0, 1)
    ax.imshow(z.to_numpy(float), cmap="cividis", aspect="auto")
    for (i, j), v in np.ndenumerate(wide.to_numpy(float)):
        ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7,
                color="white" if z.iat[i, j] < 0.5 else "black")  # fmt: skip
    ax.set_xticks(range(wide.shape[1]), wide.columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(wide)), wide.index, fontsize=8)
    ax.set_title("top-1 (%) per set; colour: scaled within each column (bright: best)", fontsize=9)
    return fig


def plot_replicate_spread(rows: pd.DataFrame) -> Figure:
    """Each method's Δ vs the best individual model over the replicates: box and dots, ID and Avg OOD (notebook 08)."""
    methods = [m for m in rows["method"].unique() if m != "Best individual"]
    fig, axes = _figure(10.0, 0.42 * len(methods) + 1.6, ncols=2)
    rng = np.random.default_rng(0)  # vertical jitter of the dots only
    for ax, col, title in zip(axes, ("delta_id", "delta_ood"), ("Δ ID", "Δ Avg OOD")):
        data = [rows.loc[rows["method"] == m, col].to_numpy(float) for m in methods]
        ax.boxplot(data, positions=range(len(methods)), orientation="horizontal", widths=0.55,
                   showfliers=False, medianprops={"color": "black"})  # fmt: skip
        for y, x in enumerate(data):
            ax.scatter(x, y + rng.uniform(-0.15, 0.15, len(x)), s=16, color=PALETTE["blue"],
                       alpha=0.8, zorder=3)  # fmt: skip
        ax.axvline(0, color="grey", lw=1, ls="--")
        ax.set_yticks(range(len(methods)), methods, fontsize=8)
        ax.set_title(f"{title}: method − best individual (points)", fontsize=9)
        ax.grid(axis="y", visible=False)
    axes[0].invert_yaxis()
    axes[1].invert_yaxis()
    axes[1].set_yticklabels([])
    n = rows["replicate"].nunique()
    fig.suptitle(f"{n} replicates: dots = replicates, box = quartiles, line = median", fontsize=9)
    return fig


def why_soups_figures(
    tables: dict[str, pd.DataFrame], meta: dict | None = None
) -> dict[str, Figure]:
    """Notebook 07's figures from its saved tables (`analysis.load_tables`), by file stem."""
    meta = meta or {}
    figs: dict[str, Figure] = {}
    if "landscape" in tables:
        figs["why_soups_a_landscape"] = plot_error_landscape(
            tables["landscape"], title=meta.get("landscape_title")
        )
    if "pairs" in tables:
        figs["why_soups_b_angle"] = plot_interpolation_advantage(tables["pairs"])
        figs["why_soups_c_ensemble_vs_soup"] = plot_ensemble_vs_soup(tables["pairs"])
    if "random_order" in tables:
        figs["why_soups_d_random_order"] = plot_random_order(tables["random_order"])
    if "wise" in tables:
        figs["why_soups_e_wise"] = plot_wise_curves(tables["wise"], meta.get("id_label", "ID"))
    return figs


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 130) -> Path:
    """Write a figure as PNG atomically, without the software tag (same figure, same bytes)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})
    return path
