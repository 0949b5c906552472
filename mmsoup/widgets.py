"""The λ explorer: mix two models component by component with sliders and watch the accuracies.

One slider per live component sets λ^j in Ψ'(λ)^j = λ^j·A^j + (1-λ^j)·B^j (MMS Alg. 1); the
readouts (held-out, ID test, each shift) are recomputed with the fast evaluator when a slider is
released, not on every drag step. A bar chart shows the λ* that manifold mixing found.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
        cls, run_dir, profile: str = "embedded", method: str = "MMS-C15"
    ) -> LambdaExplorer:
        """An explorer over an MMS soup of a run folder (notebook 06); see `from_run`."""
        return from_run(run_dir, profile, method)

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


def explorer_inputs(paths, components, meta: Mapping):
    """The default pair: Ψ before MMS's last accepted step, that step's candidate, and its λ*.

    At λ* the panel shows exactly the fused model; at λ = 1 the soup without its last ingredient.
    """
    from mmsoup.checkpoints import load_state_dict
    from mmsoup.soups import REST, interpolate, mms_steps

    steps = mms_steps(meta["info"])
    order = meta["ingredients"]
    psi = dict(load_state_dict(paths[order[0]]))
    if not steps:  # nothing was mixed in: explore the best model against the runner-up
        runner_up = sorted(range(len(paths)), key=lambda i: -meta["ingredient_val_accs"][i])[1]
        return (
            psi,
            load_state_dict(paths[runner_up]),
            [1.0] * len(components),
            (order[0], runner_up),
        )
    rest = [k for k in psi if all(k not in keys for keys in components.values())]
    plan = {**components, **({REST: rest} if rest else {})}
    for k, (candidate, lam) in enumerate(steps[:-1], start=1):
        full = list(lam) + [k / (k + 1)] * (len(plan) - len(lam))
        psi = interpolate(psi, load_state_dict(paths[candidate]), plan, full)
    candidate, lam = steps[-1]
    return psi, load_state_dict(paths[candidate]), lam, ("fused", candidate)


def from_run(run_dir, profile: str = "embedded", method: str = "MMS-C15") -> LambdaExplorer:
    """A λ explorer over an MMS soup of a run folder (notebook 06): sliders start at λ*."""
    from pathlib import Path

    from mmsoup.checkpoints import read_sidecar
    from mmsoup.context import context, ingredient_paths
    from mmsoup.partition import partition
    from mmsoup.recipes import recipe

    file = Path(run_dir) / "soups" / recipe(method).file
    if not file.is_file():
        raise MMSoupError(
            f"{file} does not exist; run notebook 02 (soups) for this run folder first."
        )
    meta = read_sidecar(file)
    ctx = context(profile)
    model = ctx.heldout.model
    components = partition(model.state_dict(), recipe(method).scheme, model=model)
    paths = ingredient_paths(profile, run_dir)
    a, b, lam, (name_a, name_b) = explorer_inputs(paths, components, meta)
    names = (
        f"{method} before its last ingredient" if name_a == "fused" else f"model_{name_a}",
        f"model_{name_b}",
    )
    return LambdaExplorer(a, b, components, ctx.evaluators, lambda_star=lam, names=names)
