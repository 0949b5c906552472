"""The notebooks' plots: matplotlib `Figure` objects drawn without pyplot state."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

# =============================================================================================
# Why soups work (notebook 07): Soups §3.2, Figs. 2, 3, 4, B.1 and D.1, from mmsoup.analysis
# =============================================================================================

WHY_COLOURS = {  # seaborn "colorblind"
    "blue": "#0173b2",
    "orange": "#de8f05",
    "green": "#029e73",
    "red": "#d55e00",
    "purple": "#cc78bc",
    "brown": "#ca9161",
    "pink": "#fbafe4",
    "grey": "#949494",
    "yellow": "#ece133",
    "cyan": "#56b4e9",
}
_CYCLE = list(WHY_COLOURS.values())


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


def _lr_colours(ax, fig, values: pd.Series, **scatter):
    """Scatter coloured by log10 learning rate (cividis), with a colour bar."""
    sc = ax.scatter(c=np.log10(values.to_numpy(float)), cmap="cividis", **scatter)
    fig.colorbar(sc, ax=ax, label="log10 learning rate (pair: geometric mean)")
    return sc


def plot_error_landscape(landscape: pd.DataFrame, title: str | None = None) -> Figure:
    """Held-out error on the plane through θ_0, θ_a, θ_b with the models and their average (Soups Fig. 2)."""
    grid = landscape[landscape["point"] == "grid"]
    z = grid.pivot(index="y", columns="x", values="error")
    fig, (ax,) = _figure(6.0, 5.0)
    ax.grid(False)
    cs = ax.contourf(z.columns, z.index, z.to_numpy(), levels=12, cmap="viridis")
    ax.contour(z.columns, z.index, z.to_numpy(), levels=cs.levels, colors="white", linewidths=0.4)
    fig.colorbar(cs, ax=ax, label="held-out error (%)")
    style = {
        "θ_0": ("s", "black"),
        "θ_a": ("o", WHY_COLOURS["orange"]),
        "θ_b": ("o", WHY_COLOURS["orange"]),
        "average": ("*", WHY_COLOURS["red"]),
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
        ax.scatter(color=WHY_COLOURS["blue"], **kw)
    ax.axhline(0, color="#555555", linewidth=0.8)
    rho = pairs["angle"].corr(pairs["advantage"], method="spearman")
    ax.set_xlabel("angle between θ_a - θ_0 and θ_b - θ_0 (degrees)")
    ax.set_ylabel("interpolation advantage (points)\nAcc(½θ_a+½θ_b) - mean endpoint Acc")
    ax.set_title(f"{len(pairs)} pairs, Spearman ρ = {rho:.2f}", fontsize=10)
    return fig


def plot_ensemble_vs_soup(pairs: pd.DataFrame) -> Figure:
    """Ensemble against soup accuracy of each pair, and their gap by learning rate (Soups Fig. 4)."""
    has_lr = "pair_lr" in pairs
    fig, axes = _figure(11.0 if has_lr else 5.5, 4.4, ncols=2 if has_lr else 1)
    ax = axes[0]
    kw = {"x": pairs["soup"], "y": pairs["ensemble"], "s": 36, "edgecolors": "white", "zorder": 3}
    if has_lr:
        _lr_colours(ax, fig, pairs["pair_lr"], **kw)
    else:
        ax.scatter(color=WHY_COLOURS["blue"], **kw)
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
            color=WHY_COLOURS["blue"],
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
    fig, axes = _figure(5.2 * len(panels), 4.2, ncols=len(panels))
    lines = (
        ("best", "best individual (by held-out)", WHY_COLOURS["grey"]),
        ("uniform", "uniform soup", WHY_COLOURS["blue"]),
        ("greedy", "greedy soup", WHY_COLOURS["orange"]),
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
        "Uniform soup": ("D", WHY_COLOURS["blue"]),
        "Greedy soup": ("*", WHY_COLOURS["orange"]),
    }
    for _, r in wise[wise["kind"] == "soup"].iterrows():
        m, colour = markers.get(r["curve"], ("P", WHY_COLOURS["red"]))
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
