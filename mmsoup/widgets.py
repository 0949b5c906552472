"""The λ explorer: mix two models component by component with sliders and watch the accuracies.

One slider per live component sets λ^j in Ψ'(λ)^j = λ^j·A^j + (1-λ^j)·B^j (MMS Alg. 1); the
readouts (held-out, ID test, each shift) are recomputed with the fast evaluator when a slider is
released, not on every drag step. A bar chart shows the λ* that manifold mixing found.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmsoup.errors import MMSoupError
from mmsoup.evaluate import Evaluator


class LambdaExplorer:
    """An ipywidgets panel over two state dicts, their components and a set of evaluators."""

    def __init__(
        self,
        model_a: Mapping[str, torch.Tensor],
        model_b: Mapping[str, torch.Tensor],
        components: Mapping[str, Sequence[str]],
        evaluators: Mapping[str, Evaluator],
        lambda_star: Sequence[float] | None = None,
        names: tuple[str, str] = ("A", "B"),
    ) -> None:
        if not evaluators:
            raise MMSoupError(
                "The λ explorer needs at least one evaluator (e.g. the held-out set)."
            )
        models = {id(ev.model) for ev in evaluators.values()}
        if len(models) != 1:
            raise MMSoupError("All evaluators of the λ explorer must share one model instance.")
        self.model_a, self.model_b = model_a, model_b
        self.components = {k: list(v) for k, v in components.items()}
        self.evaluators = dict(evaluators)
        m = len(self.components)
        self.lambda_star = [
            float(x) for x in (lambda_star if lambda_star is not None else [0.5] * m)
        ]
        if len(self.lambda_star) != m:
            raise MMSoupError(
                f"λ* has {len(self.lambda_star)} entries but there are {m} components."
            )
        self.names = names
        self.live: list[int] | None = None  # from_run: the live components' indices
        self.method: str | None = None  # what from_run opened: the soup, its step (1-based) of n
        self.step: int | None = None
        self.n_steps = 0
        self.opened = ""  # that, in words
        self.lambdas = list(self.lambda_star)
        self.n_updates = 0
        self._accuracies = self._evaluate()
        self._star_accuracies = dict(self._accuracies)  # the readouts at λ*, for the Δ line
        self._panel = None

    def _evaluate(self) -> dict[str, float]:
        """Write Ψ'(λ) into the shared model once, then score it on every evaluator."""
        first = next(iter(self.evaluators.values()))
        first.mix(self.model_a, self.model_b, self.components, self.lambdas)
        self.n_updates += 1
        return {name: 100.0 * ev.accuracy() for name, ev in self.evaluators.items()}

    @classmethod
    def from_run(
        cls,
        run_dir,
        profile: str = "embedded",
        method: str | None = None,
        step: int | None = None,
    ) -> LambdaExplorer:
        """An explorer over one MMS step of a run folder (notebook 06); see `from_run`."""
        return from_run(run_dir, profile, method, step)

    def set_lambdas(self, lambdas: Sequence[float]) -> dict[str, float]:
        """Set every λ (as releasing the sliders would) and return the new accuracies (%)."""
        if len(lambdas) != len(self.components):
            raise MMSoupError(f"Give {len(self.components)} λ values, one per component.")
        if any(not 0.0 <= x <= 1.0 for x in lambdas):
            raise MMSoupError("Each λ must lie in [0, 1].")
        self.lambdas = [float(x) for x in lambdas]
        self._accuracies = self._evaluate()
        if self._panel is not None:
            self._sync_widgets()
        return dict(self._accuracies)

    def reset(self) -> dict[str, float]:
        """Go back to the λ* that manifold mixing found."""
        return self.set_lambdas(self.lambda_star)

    def readouts(self) -> pd.DataFrame:
        """The current accuracies (%), one row per evaluation set."""
        return pd.DataFrame(
            {"set": list(self._accuracies), "accuracy": list(self._accuracies.values())}
        )

    def summary(self) -> list[str]:
        """What this explorer shows, in sentences from its own numbers (chapter 06's closing
        list): the step opened, how far λ* lies from one plain average, and what per-component
        mixing changed on every set against that average (λ = λ0 everywhere)."""
        import numpy as np

        lam = np.asarray(self.lambda_star)
        k = self.step
        lam0 = k / (k + 1) if k else float(np.median(lam))
        at_star = dict(self._star_accuracies)
        plain = self.set_lambdas([lam0] * len(lam))
        self.set_lambdas(self.lambda_star)
        off = int((np.abs(lam - lam0) > 1e-9).sum())
        lines = [self.opened + "." if self.opened else "Two models mixed per component."]
        lines.append(
            f"λ* ranges from {lam.min():.3f} to {lam.max():.3f}; {off} of {len(lam)} components "
            f"left the plain running average λ0 = {lam0:.3f}."
        )
        deltas = ", ".join(f"{s} {at_star[s] - plain[s]:+.2f}" for s in at_star)
        lines.append(
            f"Per-component λ* against the plain average (points): {deltas}"
            + (" — the same predictions." if all(at_star[s] == plain[s] for s in at_star) else ".")
        )
        return lines

    def static_figure(self, n_components: int = 2, points: int = 11, evaluator: str = "heldout"):
        """What the panel shows, as a figure for a page (a static copy of the notebook): the λ*
        of every component as bars, and `evaluator` accuracy along λ_j of the `n_components`
        components whose λ* lies furthest from the plain average's λ0, the others at λ*. The
        explorer is back at λ* afterwards."""
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        names = list(self.components)
        lam0 = float(np.median(self.lambda_star))  # the start point most components kept
        moved = np.abs(np.asarray(self.lambda_star) - lam0)
        live = getattr(self, "live", None) or range(len(names))  # inert ones change nothing
        order = sorted(live, key=lambda j: -moved[j])  # stable: the first live ones on ties
        picks = [int(j) for j in order[:n_components]]
        ev = self.evaluators.get(evaluator) or next(iter(self.evaluators.values()))
        grid = np.linspace(0.0, 1.0, points)
        curves = {}
        for j in picks:
            accs = []
            for x in grid:
                lam = list(self.lambda_star)
                lam[j] = float(x)
                ev.mix(self.model_a, self.model_b, self.components, lam)
                accs.append(100.0 * ev.accuracy())
            curves[names[j]] = accs
        self.set_lambdas(self.lambda_star)
        fig = Figure(figsize=(10, 3.4))
        FigureCanvasAgg(fig)
        left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
        short = [n.replace("model.visual.", "visual.").replace("model.", "") for n in names]
        left.barh(short, self.lambda_star, color="#0173b2")
        left.axvline(lam0, color="grey", ls="--", lw=1)
        left.set_xlim(0, 1)
        left.invert_yaxis()
        left.tick_params(axis="y", labelsize=7)
        left.set_xlabel(f"λ* (1: all of {self.names[0]}); dashed: median λ* {lam0:.2f}", fontsize=8)
        left.set_title("λ* per component", fontsize=9)
        for accs, j in zip(curves.values(), picks):
            line = right.plot(grid, accs, marker=".", label=short[j])[0]
            right.axvline(self.lambda_star[j], color=line.get_color(), ls=":", lw=1)
        right.set_xlabel("λ_j, the other components at λ* (dotted: λ*_j)", fontsize=8)
        right.set_ylabel(f"{evaluator} accuracy (%)", fontsize=8)
        right.set_title(f"{evaluator} accuracy along one λ", fontsize=9)
        right.legend(fontsize=7)
        right.grid(alpha=0.3)
        fig.tight_layout()
        return fig

    # -- the ipywidgets front end ------------------------------------------------------------
    @property
    def panel(self):
        """The ipywidgets panel (built on first use): sliders, readouts, λ* bars, reset button."""
        if self._panel is None:
            self._build()
        return self._panel

    @property
    def sliders(self) -> list:
        """The component sliders, in component order."""
        self.panel  # noqa: B018 (builds the panel)
        return self._sliders

    def _build(self) -> None:
        import ipywidgets as w

        layout = w.Layout(width="440px")
        style = {"description_width": "210px"}
        self._sliders = []
        for name, value in zip(self.components, self.lambdas):
            s = w.FloatSlider(
                value=value,
                min=0.0,
                max=1.0,
                step=0.01,
                description=_short(name),
                tooltip=name,  # the full component name, should a long label be cut
                continuous_update=False,
                readout_format=".2f",
                layout=layout,
                style=style,
            )
            s.add_class("mmsoup-slider")
            s.observe(self._on_slider, names="value")
            self._sliders.append(s)
        self._readout = w.HTML()
        self._readout.add_class("mmsoup-readout")
        self._reset = w.Button(
            description="reset to λ*",
            icon="undo",
            button_style="info",
            tooltip="put every slider back at the λ* that manifold mixing found",
            layout=w.Layout(margin="8px 0 0 218px"),
        )
        self._reset.add_class("mmsoup-reset")
        self._reset.on_click(lambda _: self.reset())
        self._bars = w.Output(layout=w.Layout(margin="0 0 0 16px"))
        with self._bars:
            _plot_lambda_star(self.components, self.lambda_star)
        header = w.HTML(
            f"<b>λ = 1</b>: all of <i>{self.names[0]}</i> &nbsp;·&nbsp; "
            f"<b>λ = 0</b>: all of <i>{self.names[1]}</i> &nbsp;·&nbsp; "
            "accuracies recompute when a slider is released"
        )
        self._panel = w.VBox(
            [
                header,
                self._readout,
                w.HBox(
                    [w.VBox(self._sliders + [self._reset]), self._bars],
                    layout=w.Layout(align_items="flex-start"),
                ),
            ],
            layout=w.Layout(padding="4px"),
        )
        self._panel.add_class("mmsoup-lambda-explorer")
        self._sync_widgets()

    def _on_slider(self, change) -> None:
        if getattr(self, "_syncing", False):
            return
        self.lambdas = [s.value for s in self._sliders]
        self._accuracies = self._evaluate()
        self._render_readouts()

    def _sync_widgets(self) -> None:
        self._syncing = True
        try:
            for s, value in zip(self._sliders, self.lambdas):
                s.value = value
        finally:
            self._syncing = False
        self._render_readouts()

    def _render_readouts(self) -> None:
        """Top-1 per set (%), and beneath it the change from the readouts at λ*."""
        head, accs, deltas = [f"<th style='{_TH}'></th>"], [_label("top-1")], [_label("Δ vs λ*")]
        for name, acc in self._accuracies.items():
            delta = acc - self._star_accuracies.get(name, acc)
            color = "#2a7a2a" if delta > 0.005 else "#b03a2e" if delta < -0.005 else "#888"
            head.append(f"<th class='mmsoup-set' style='{_TH}'>{name}</th>")
            accs.append(
                f"<td style='{_TD}'><b class='mmsoup-acc' data-set='{name}'>{acc:.2f}%</b></td>"
            )
            deltas.append(
                f"<td style='{_TD};font-size:0.85em;color:{color}'>"
                f"<span class='mmsoup-delta' data-set='{name}'>{delta:+.2f}</span></td>"
            )
        rows = "".join(f"<tr>{''.join(r)}</tr>" for r in (head, accs, deltas))
        self._readout.value = (
            f"<table class='mmsoup-readouts' data-update='{self.n_updates}' "
            f"style='border-collapse:collapse;margin:6px 0 10px 0'>{rows}</table>"
        )


_TH = "padding:2px 12px;font-weight:normal;color:#555;border-bottom:1px solid #ccc;text-align:right"
_TD = "padding:2px 12px;text-align:right"


def _label(text: str) -> str:
    """A row label of the readout table."""
    return f"<td style='{_TD};text-align:left;color:#555'>{text}</td>"


def _short(name: str) -> str:
    """A slider label: the component name without the wrapper's `model.` prefix."""
    return name.removeprefix("model.")


def _plot_lambda_star(
    components: Mapping[str, Sequence[str]], lambda_star: Sequence[float]
) -> None:
    """Horizontal bars of λ* per component (drawn into the current ipywidgets Output)."""
    import matplotlib.pyplot as plt

    names = [_short(n) for n in components]
    fig, ax = plt.subplots(figsize=(3.4, 0.32 * len(names) + 0.8), dpi=100)
    ax.barh(range(len(names)), lambda_star, color="#4c72b0", height=0.6)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0", "", "0.5", "", "1"], fontsize=8)
    ax.grid(axis="x", color="#ddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("λ* found by manifold mixing", fontsize=9)
    fig.tight_layout()
    plt.show()


def mms_steps(info: Mapping[str, Any]) -> list[tuple[int, list[float]]]:
    """(candidate, λ*) of each accepted step of an MMS soup, from its `info` (MMS Alg. 1):
    the steps the explorer replays."""
    steps = [(d["candidate"], d.get("lambdas")) for d in info["decisions"]]
    steps = [s for s, d in zip(steps, info["decisions"]) if d["decision"] == "accepted"]
    if any(lam is None for _, lam in steps):
        raise MMSoupError(
            "This MMS soup was made by an older mmsoup that did not record λ* per step; "
            "rebuild it (notebook 02) to replay its steps."
        )
    return steps


def most_uneven_step(
    info: Mapping[str, Any], over: Sequence[int] | None = None
) -> tuple[int, float] | None:
    """The accepted MMS step whose λ* differs most between components, and that spread.

    The spread of a step is the standard deviation (population) of its λ* over the components
    `over` (indices into the step's λ*; default: every searched component, REST, held at λ0,
    never counts): 0 when the step mixed every component alike, as a plain average would. Returns
    (index into `mms_steps(info)`, spread); a tie goes to the later step; None when MMS accepted
    no candidate. This is the step the λ explorer opens on (notebook 06).
    """
    steps = mms_steps(info)
    if not steps:
        return None
    idx = list(range(int(info["n_components"]))) if over is None else list(over)
    if not idx:
        raise MMSoupError("most_uneven_step needs at least one component to measure λ* over.")
    spreads = [lambda_spread(lam, idx) for _, lam in steps]
    best = max(range(len(steps)), key=lambda k: (spreads[k], k))
    return best, spreads[best]


def lambda_spread(lam: Sequence[float], over: Sequence[int]) -> float:
    """The standard deviation (population) of λ* over the component indices `over`."""
    return float(np.std([lam[j] for j in over]))


def explorer_inputs(paths, components, meta: Mapping, step: int | None = None, over=None):
    """The pair of one accepted MMS step: Ψ before it, its candidate θ_i, and its λ* (MMS Alg. 1).

    `step` counts the accepted steps from 1 (a negative one from the end: -1 is the last); None
    is the step whose λ* differs most between components (`most_uneven_step`, measured over
    the component indices `over`). At λ* the panel shows Ψ after that step, exactly: keys outside
    `components` (REST) are mixed into Ψ at the step's λ0 beforehand. Returns (A, B, λ*,
    (name A, name B), (step, number of steps)); with no accepted step, the best ingredient
    against the runner-up at λ = 1 and step (None, 0).
    """
    from mmsoup.checkpoints import load_state_dict
    from mmsoup.soups import REST, interpolate

    steps = mms_steps(meta["info"])
    order = meta["ingredients"]
    psi = dict(load_state_dict(paths[order[0]]))
    if not steps and step is not None:
        raise MMSoupError(
            f"This MMS soup accepted no candidate, so it has no step {step}; leave step=None to "
            "explore its best ingredient against the runner-up."
        )
    if not steps:  # nothing was mixed in: explore the best model against the runner-up
        runner_up = sorted(range(len(paths)), key=lambda i: -meta["ingredient_val_accs"][i])[1]
        return (
            psi,
            load_state_dict(paths[runner_up]),
            [1.0] * len(components),
            (order[0], runner_up),
            (None, 0),
        )
    n = len(steps)
    if step is None:
        k = most_uneven_step(meta["info"], over)[0]
    elif -n <= step <= n and step != 0:
        k = step - 1 if step > 0 else n + step
    else:
        raise MMSoupError(
            f"This MMS soup has {n} accepted step(s): give step 1..{n} (or -{n}..-1), not {step}."
        )
    rest = [key for key in psi if all(key not in keys for keys in components.values())]
    plan = {**components, **({REST: rest} if rest else {})}
    for j, (candidate, lam) in enumerate(steps[:k], start=1):
        full = list(lam) + [j / (j + 1)] * (len(plan) - len(lam))
        psi = interpolate(psi, load_state_dict(paths[candidate]), plan, full)
    candidate, lam = steps[k]
    theta = load_state_dict(paths[candidate])
    m = len(components)
    if rest:  # REST follows λ0 in MMS; the explorer copies A's REST, so A carries the mixed one
        lam0 = lam[m] if len(lam) > m else (k + 1) / (k + 2)
        psi = interpolate(psi, theta, {REST: rest}, [lam0])
    return psi, theta, list(lam[:m]), ("fused", candidate), (k + 1, n)


def from_run(
    run_dir,
    profile: str = "embedded",
    method: str | None = None,
    step: int | None = None,
) -> LambdaExplorer:
    """A λ explorer over one accepted step of an MMS soup of a run folder (notebook 06).

    By default it opens on the most instructive step: among the accepted steps of every MMS soup
    in the run, the one whose λ* differs most between its live components
    (`most_uneven_step`). `method` (e.g. "MMS-C15") keeps to that soup; `step` picks the
    step (1 = the first candidate mixed in, -1 = the last; MMS-C15 if no method is given).
    The sliders start at λ*; `explorer.method`, `.step` and `.n_steps` say what was opened, and
    `explorer.opened` says it in words.
    """
    from pathlib import Path

    from mmsoup.checkpoints import read_sidecar
    from mmsoup.context import context, ingredient_paths
    from mmsoup.partition import live_components, partition
    from mmsoup.recipes import MMS_SCHEMES, recipe

    soups = Path(run_dir) / "soups"
    if method is None and step is not None:
        method = "MMS-C15"
    methods = [method] if method else [n for n in MMS_SCHEMES if (soups / recipe(n).file).is_file()]
    missing = [n for n in methods if not (soups / recipe(n).file).is_file()]
    if missing or not methods:
        file = soups / recipe((missing or ["MMS-C15"])[0]).file
        raise MMSoupError(
            f"{file} does not exist; run notebook 02 (soups) for this run folder first."
        )
    ctx = context(profile)
    model = ctx.heldout.model
    found = {}  # method: (sidecar, components, live indices, (step index, spread) or None)
    for name in methods:
        meta = read_sidecar(soups / recipe(name).file)
        comps = partition(model.state_dict(), recipe(name).scheme, model=model)
        _, inert = live_components(comps, model)  # λ of an inert component changes nothing
        over = [j for j, c in enumerate(comps) if c not in inert] or None
        found[name] = (meta, comps, over, most_uneven_step(meta["info"], over))
    picked = [n for n in methods if found[n][3] is not None]
    if method is None:
        fallback = "MMS-C15" if "MMS-C15" in found else methods[0]
        method = max(picked, key=lambda n: found[n][3][1]) if picked else fallback
    meta, components, over, _ = found[method]
    paths = ingredient_paths(profile, run_dir)
    a, b, lam, (name_a, name_b), (k, n) = explorer_inputs(paths, components, meta, step, over)
    names = (
        f"{method} before step {k} of {n}" if name_a == "fused" else f"model_{name_a}",
        f"model_{name_b}",
    )
    explorer = LambdaExplorer(a, b, components, ctx.evaluators, lambda_star=lam, names=names)
    explorer.method, explorer.step, explorer.n_steps = method, k, n
    explorer.live = over  # indices of the components that can change a prediction (None: all)
    if k is None:
        explorer.opened = (
            f"{method} accepted no candidate: its best ingredient against the runner-up"
        )
    else:
        spread = lambda_spread(lam, over or range(len(lam)))
        explorer.opened = (
            f"{method}, accepted step {k} of {n} (model_{name_b} mixed in; "
            f"λ* standard deviation over the live components {spread:.3f})"
        )
    return explorer


def from_ablation(run_dir, method: str = "MMS-C8", step: int | None = None) -> LambdaExplorer:
    """A λ explorer over an MMS soup of a conditions-ablation run (`mmsoup.ablation`): its
    profile spec (held-out size, budget, pool) is read from the run's `ablation.json`."""
    import json
    from pathlib import Path

    done = Path(run_dir) / "ablation.json"
    if not done.is_file():
        raise MMSoupError(f"{done} does not exist; run `make ablation` first.")
    info = json.loads(done.read_text())
    explorer = from_run(run_dir, info["profile"], method=method, step=step)
    explorer.opened = (
        f"conditions ablation, {info['condition']} r{info['replicate']}: " + explorer.opened
    )
    return explorer
