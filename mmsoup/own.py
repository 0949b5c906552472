"""Soup your own checkpoints: a YAML config -> model, ingredients, held-out data -> soups on disk.

`mmsoup soup --config soup.yaml` (and `soup_from_config` from Python) builds the model by name
(`mmsoup.factories`), streams the checkpoints (`.safetensors`, sharded, `.pt`/`.bin`, Hugging Face
folders), ranks them on the held-out set and runs the requested recipes (uniform, greedy, MMS, on
request the learned soup and the logit ensembles). It writes each fused model as `.safetensors`
(sharded with `shard_size`) with its JSON sidecar and a `MODEL_CARD.md`. Integer buffers come
from the best ingredient; BatchNorm statistics can be recomputed on the held-out batches after
mixing (`bn_recalibration`: `final`, or `each` evaluation). `inspect_pool` is the pre-flight:
accuracy along the line from the best model to each candidate and the angle between their updates
from the shared init (Soups §3.2).
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from mmsoup.checkpoints import (
    KEY_ORDER,
    RenamedCheckpoint,
    load_state_dict,
    open_ingredient,
    provenance,
    sidecar_path,
)
from mmsoup.errors import MMSoupError
from mmsoup.evaluate import Evaluator
from mmsoup.factories import create_model
from mmsoup.io import atomic_path, check_writable, write_json, write_text
from mmsoup.mixing import interpolate
from mmsoup.model_card import model_card
from mmsoup.progress import tqdm
from mmsoup.result import ALL, Scorer, SoupResult

RECIPES = ("uniform", "greedy", "mms", "learned", "ensemble", "greedy_ensemble")
BN_MODES = ("none", "final", "each")
# key -> (type, default); paths are relative to the config file's folder
KEYS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "model": (str, None),
    "model_kwargs": (dict, {}),
    "image_size": (int, None),
    "ingredients": ((list, str), None),
    "init": (str, None),
    "held_out": (str, None),
    "recipes": (list, ["uniform", "greedy", "mms"]),
    "partition": (str, "blocks:4"),
    "mms": (dict, {}),
    "learned": (dict, {}),
    "bn_recalibration": (str, "none"),
    "batch_size": (int, 256),
    "device": (str, None),
    "out": (str, "soup"),
    "shard_size": ((str, int), None),
    "alphas": (list, [0.25, 0.5, 0.75]),
    "barrier": ((float, int), 0.05),  # inspect: a midpoint this far below both ends collapses
}
_PATHS = ("init", "held_out", "out")


@dataclass
class SoupConfig:
    """A validated soup config: the keys of KEYS, paths resolved, and the file's text verbatim."""

    values: dict[str, Any]
    ingredients: list[str]
    text: str = ""
    source: str = "<dict>"
    overrides: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["values"][key]
        except KeyError:
            raise AttributeError(key) from None


def load_config(
    config: str | os.PathLike | Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> SoupConfig:
    """Read and check a soup config (a YAML file or a dict); `overrides` (CLI flags) win over keys."""
    import yaml

    if isinstance(config, Mapping):
        raw, text, source, base = dict(config), "", "<dict>", Path.cwd()
    else:
        path = Path(config).expanduser()
        if not path.is_file():
            raise MMSoupError(f"Config {path} does not exist; check the path.")
        text, source, base = path.read_text(), str(path), path.parent
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MMSoupError(f"Config {path} is not valid YAML ({e}); fix its syntax.") from e
        if not isinstance(raw, dict):
            raise MMSoupError(f"Config {path} must be a YAML mapping of keys (model:, ...).")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    raw |= given
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise MMSoupError(
            f"Config {source} has the unknown key {unknown[0]!r}; valid keys: {', '.join(KEYS)}."
        )
    values = {k: raw.get(k, default) for k, (_, default) in KEYS.items()}
    for key, (kind, _) in KEYS.items():
        if values[key] is not None and not isinstance(values[key], kind):
            raise MMSoupError(
                f"Config {source}: {key!r} must be {_kind_name(kind)}, got {values[key]!r}."
            )
    for key in ("model", "ingredients"):
        if values[key] is None:
            raise MMSoupError(f"Config {source} lacks the key {key!r}; add it (see the README).")
    bad = [r for r in values["recipes"] if r not in RECIPES]
    if bad:
        raise MMSoupError(
            f"Config {source}: unknown recipe {bad[0]!r}; pick from {', '.join(RECIPES)}."
        )
    if values["bn_recalibration"] not in BN_MODES:
        raise MMSoupError(
            f"Config {source}: bn_recalibration must be one of {', '.join(BN_MODES)}, got {values['bn_recalibration']!r}."
        )
    for key in _PATHS:
        if values[key] is not None:
            values[key] = str(base / Path(values[key]).expanduser())
    if values["model"].startswith((".", "/", "~")):  # a model folder, relative to the config
        values["model"] = str(base / Path(values["model"]).expanduser())
    return SoupConfig(
        values, _ingredients(values["ingredients"], base, source), text, source, given
    )


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        list: "a list",
        dict: "a mapping",
    }
    return " or ".join(names[k] for k in kinds)


def _ingredients(entries: list[str] | str, base: Path, source: str) -> list[str]:
    """Checkpoint paths: each entry a path or a glob pattern, relative to the config's folder."""
    paths: list[str] = []
    for entry in [entries] if isinstance(entries, str) else entries:
        pattern = str(base / Path(str(entry)).expanduser())
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found or not os.path.exists(found[0]):
            raise MMSoupError(
                f"Config {source}: ingredient {entry!r} matches no file ({pattern}); check the path."
            )
        paths += found
    return paths


# -- held-out data --------------------------------------------------------------------------------
def load_held_out(path: str | os.PathLike, transform: Callable | None) -> tuple[Tensor, Tensor]:
    """(inputs, labels) of an ImageFolder directory (the model's own preprocessing) or a tensor file
    (`.pt`/`.npz` with `images` or `inputs`, and `labels`)."""
    path = Path(path)
    if path.is_dir():
        from torchvision.datasets import ImageFolder

        if transform is None:
            raise MMSoupError(
                f"No image preprocessing is known for this model; pass held_out as a tensor file instead of {path}."
            )
        try:
            data = ImageFolder(str(path), transform=transform)
        except (FileNotFoundError, RuntimeError) as e:
            raise MMSoupError(
                f"Held-out folder {path} is not an ImageFolder ({e}); use one folder per class of images."
            ) from e
        pairs = [data[i] for i in tqdm(range(len(data)), desc="held-out images", leave=False)]
        return torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])
    if not path.is_file():
        raise MMSoupError(f"Held-out data {path} does not exist; check the path.")
    if path.suffix == ".npz":
        with np.load(path) as f:
            data = {k: torch.from_numpy(f[k]) for k in f.files}
    elif path.suffix in (".pt", ".pth"):
        data = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise MMSoupError(
            f"Held-out data {path} has suffix {path.suffix!r}; pass an ImageFolder directory, .pt or .npz."
        )
    inputs = data.get("images", data.get("inputs")) if isinstance(data, Mapping) else None
    if inputs is None or "labels" not in data:
        raise MMSoupError(
            f"Held-out data {path} must hold 'images' (or 'inputs') and 'labels'; re-save it as such a mapping."
        )
    return torch.as_tensor(inputs), torch.as_tensor(data["labels"]).long()


# -- BatchNorm recalibration (torch.optim.swa_utils.update_bn) -------------------------------------
def bn_statistics(model: nn.Module) -> list[str]:
    """State-dict keys of the BatchNorm running statistics of `model`."""
    return [
        f"{name}.{stat}"
        for name, mod in model.named_modules()
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats
        for stat in ("running_mean", "running_var")
    ]


def recalibrate(evaluator: Evaluator) -> None:
    """Reset and recompute the BatchNorm running statistics on the held-out batches (update_bn)."""
    from torch.optim.swa_utils import update_bn

    with torch.inference_mode(False), torch.no_grad():
        update_bn((evaluator.preprocess(x) for x, _ in evaluator.batches()), evaluator.model)


class RecalibratingEvaluator(Evaluator):
    """An Evaluator that recomputes BatchNorm statistics on the held-out batches before every
    evaluation, so each candidate soup is scored with the statistics of its own weights."""

    seconds = 0.0  # time spent recalibrating
    calls = 0  # recalibrations done

    def _recalibrate(self) -> None:
        t0 = time.perf_counter()
        recalibrate(self)
        self.seconds += time.perf_counter() - t0
        self.calls += 1

    def accuracy(self) -> float:
        self._recalibrate()
        return super().accuracy()

    def mixed_accuracy(self, base, other, components, lambdas) -> float:
        self.mix(base, other, components, lambdas)
        self._recalibrate()
        return super().accuracy()


# -- the pool --------------------------------------------------------------------------------------
@dataclass
class Pool:
    """What a soup needs: the model, the ingredients, the scorer of held-out accuracy."""

    config: SoupConfig
    model: nn.Module
    ingredients: list[str]
    val_acc: Callable[[Mapping[str, Tensor]], float]  # an Evaluator unless given from Python
    example_input: Tensor | None
    file_keys: dict[str, str] | None = None  # file key -> model key, when the files' names differ

    @property
    def evaluator(self) -> Evaluator | None:
        return self.val_acc if isinstance(self.val_acc, Evaluator) else None

    @property
    def names(self) -> list[str]:
        return [_name(p) for p in self.ingredients]


def _name(path: str) -> str:
    p = Path(path)
    return p.parent.name if p.name.endswith(".index.json") else p.name


def _check_fits(model: nn.Module, path: str, config: SoupConfig) -> None:
    """The first checkpoint's keys and shapes are the model's (else one sentence, before any work)."""
    want = model.state_dict()
    state = open_ingredient(path)
    missing, extra = sorted(want.keys() - state.keys()), sorted(state.keys() - want.keys())
    if missing or extra:
        key = (missing or extra)[0]
        what = "lacks" if missing else "has the unexpected key"
        raise MMSoupError(
            f"Checkpoint {path} {what} {key!r} ({len(missing)} missing, {len(extra)} unexpected) for model "
            f"{config.model!r}; pick the model the checkpoints were saved from."
        )
    for key, t in want.items():
        if state[key].shape != t.shape:
            raise MMSoupError(
                f"Checkpoint {path}: {key!r} has shape {tuple(state[key].shape)} but model {config.model!r} "
                f"has {tuple(t.shape)}; set model_kwargs (e.g. num_classes) to match the checkpoints."
            )


def open_pool(
    config: SoupConfig | str | os.PathLike | Mapping[str, Any],
    val_acc: Callable[[Mapping[str, Tensor]], float] | None = None,
) -> Pool:
    """Build the model, check the checkpoints fit it, load the held-out set (or take `val_acc`)."""
    cfg = config if isinstance(config, SoupConfig) else load_config(config)
    check_writable(cfg.out, "out")
    if cfg.init is not None and not os.path.exists(cfg.init):
        raise MMSoupError(f"Config {cfg.source}: init {cfg.init} does not exist; check the path.")
    built = create_model(cfg.model, image_size=cfg.image_size, **cfg.model_kwargs)
    model = built.module
    ings, file_keys = _under_model_keys(cfg.ingredients, built.checkpoint_keys)
    _check_fits(model, ings[0], cfg)
    if val_acc is not None:
        return Pool(cfg, model, ings, val_acc, None, file_keys)
    if cfg.held_out is None:
        raise MMSoupError(
            f"Config {cfg.source} lacks 'held_out'; add an ImageFolder or tensor file (or pass val_acc from Python)."
        )
    images, labels = load_held_out(cfg.held_out, built.transform)
    recal = cfg.bn_recalibration == "each" and bn_statistics(model)
    kind = RecalibratingEvaluator if recal else Evaluator
    ev = kind(model, images, labels, device=cfg.device, batch_size=cfg.batch_size)
    return Pool(cfg, model, ings, ev, images[:1], file_keys)


def _under_model_keys(
    paths: list[str], rename: Mapping[str, str] | None
) -> tuple[list, dict[str, str] | None]:
    """The checkpoints under the model's key names. Files saved by transformers >= 5 may name
    tensors otherwise than its modules do (`Model.checkpoint_keys`): they are renamed on opening,
    and the returned {file key: model key} renames the soups back when they are written."""
    renamed = {k: v for k, v in (rename or {}).items() if k != v}
    if not renamed or not renamed.keys() & open_ingredient(paths[0]).keys():
        return list(paths), None  # the files hold the module's own names
    return [RenamedCheckpoint(p, rename) for p in paths], dict(rename)


def _bn_spent(pool: Pool) -> tuple[float, int]:
    """Seconds and number of recalibrations the pool's evaluator has done so far (mode each)."""
    ev = pool.evaluator
    return (ev.seconds, ev.calls) if isinstance(ev, RecalibratingEvaluator) else (0.0, 0)


def _finish_bn(pool: Pool, result: SoupResult, since: tuple[float, int] = (0.0, 0)) -> None:
    """Recompute the soup's BatchNorm statistics on the held-out batches (mode final/each);
    `since`: `_bn_spent` when the recipe started, so each soup records only its own search's cost."""
    ev, keys = pool.evaluator, bn_statistics(pool.model)
    if pool.config.bn_recalibration == "none" or ev is None or not keys:
        return
    ev.load(result.state_dict)
    before = Evaluator.accuracy(ev)  # the soup's mixed statistics
    t0 = time.perf_counter()
    recalibrate(ev)
    seconds = time.perf_counter() - t0
    live = ev.model.state_dict()
    for k in keys:
        result.state_dict[k] = live[k].detach().to("cpu", copy=True)
    after = Evaluator.accuracy(ev)
    result.info["bn_recalibration"] = {
        "mode": pool.config.bn_recalibration,
        "acc_mixed_statistics": before,
        "acc_recalibrated": after,
        "seconds_final": seconds,
        "seconds_during_search": _bn_spent(pool)[0] - since[0],
        "recalibrations_during_search": _bn_spent(pool)[1] - since[1],
    }
    result.val_acc = after


def run_recipes(pool: Pool, progress: bool = True) -> dict[str, Any]:
    """Rank the ingredients once, then run each requested recipe (Soups §2, Recipe 1; MMS Alg. 1)."""
    from mmsoup import soups
    from mmsoup.partition import partition

    cfg, ings, n = pool.config, pool.ingredients, len(pool.ingredients)
    scorer = Scorer(pool.val_acc)
    bar = tqdm(ings, desc="ingredients", disable=not progress)
    accs = [scorer.state(open_ingredient(p), i, "ingredient") for i, p in enumerate(bar)]
    best = int(np.argmax(accs))  # the first of equal maxima, as best_first
    needs_parts = {"mms", "learned"} & set(cfg.recipes)
    comps = (
        partition(pool.model, cfg.partition, example_input=pool.example_input)
        if needs_parts
        else None
    )
    out: dict[str, Any] = {"ingredient_val_accs": accs, "ingredient_evals": n, "partition": comps}
    if isinstance(pool.evaluator, RecalibratingEvaluator):  # mode each: ranking's share
        spent = _bn_spent(pool)
        out["ingredient_bn_recalibration"] = {"seconds": spent[0], "recalibrations": spent[1]}
    for recipe in cfg.recipes:
        since = _bn_spent(pool)
        if recipe == "uniform":
            t0 = time.perf_counter()
            state = soups.uniform_soup(ings, buffers_from=best)
            acc = scorer.state(state, -1, "uniform")
            info = {"recipe": "uniform_soup", "wall_time_s": time.perf_counter() - t0}
            res = SoupResult(
                state, acc, list(range(n)), {ALL: [1 / n] * n}, 1, scorer.trace[-1:], accs, info
            )
        elif recipe == "greedy":
            res = soups.greedy_soup(ings, pool.val_acc, ingredient_val_accs=accs, progress=progress)
        elif recipe == "mms":
            res = soups.manifold_mixing_soup(
                ings, pool.val_acc, comps, ingredient_val_accs=accs, progress=progress, **cfg.mms
            )
        elif pool.evaluator is None:
            raise MMSoupError(
                f"Recipe {recipe!r} needs held-out tensors (an Evaluator), not a val_acc callable; drop it from recipes."
            )
        elif recipe == "learned":
            res = soups.learned_soup(
                ings,
                pool.evaluator,
                comps,
                ingredient_val_accs=accs,
                progress=progress,
                **cfg.learned,
            )
        else:
            make = soups.greedy_ensemble if recipe == "greedy_ensemble" else soups.logit_ensemble
            out[recipe] = make(ings, pool.evaluator)
            continue
        if isinstance(res, SoupResult):
            order = pool.model.state_dict()  # the model's key order, whatever the files' order
            res.state_dict = {k: res.state_dict[k] for k in order}
            _finish_bn(pool, res, since)
        out[recipe] = res
    return out


# -- writing ---------------------------------------------------------------------------------------
def _write(result: SoupResult, path: Path, shard_size: str | int | None) -> Path:
    """The fused model as `.safetensors` (or a folder of shards with safetensors' index) + sidecar."""
    if shard_size is None:
        return result.save(path.with_suffix(".safetensors"))
    from huggingface_hub import save_torch_state_dict

    folder = path.with_suffix("")
    meta = {k: getattr(result, k) for k in ("val_acc", "ingredients", "weights", "n_evals")}
    meta |= {"ingredient_val_accs": result.ingredient_val_accs, "trace": result.trace}
    state = {k: v.detach().cpu().contiguous() for k, v in result.state_dict.items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_torch_state_dict(
            state, tmp, max_shard_size=shard_size, metadata={KEY_ORDER: json.dumps(list(state))}
        )
        with atomic_path(sidecar_path(folder)) as side:  # the shards appear with their sidecar
            write_json(side, provenance(**meta, info=result.info, shard_size=shard_size))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def soup_from_config(
    config: SoupConfig | str | os.PathLike | Mapping[str, Any],
    val_acc: Callable[[Mapping[str, Tensor]], float] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the config's recipes and write the soups, their sidecars and MODEL_CARD.md into `out`."""
    pool = open_pool(config, val_acc)
    cfg = pool.config
    shard_size = _shard_size(cfg.shard_size)
    results = run_recipes(pool, progress)
    out = Path(cfg.out)
    files = {}
    for recipe in cfg.recipes:
        res = results[recipe]
        if isinstance(res, SoupResult):
            if pool.file_keys:  # the soup under the checkpoints' own names, as they were saved
                back = {m: f for f, m in pool.file_keys.items()}
                res.state_dict = {back.get(k, k): v for k, v in res.state_dict.items()}
            files[recipe] = _write(res, out / recipe, shard_size)
        else:
            files[recipe] = res.save(out / f"{recipe}.json")
    results["files"] = files
    write_text(out / "MODEL_CARD.md", model_card(pool, results))
    return results


def _shard_size(value: str | int | None) -> str | int | None:
    """A shard size (bytes, or '500MB'/'2GB' as huggingface_hub reads it), checked before any work."""
    if value is None:
        return None
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        return value if isinstance(value, int) else parse_size_to_int(str(value))
    except ValueError as e:
        raise MMSoupError(f"shard_size {value!r} is not a size; use e.g. '500MB' or '2GB'.") from e


# -- pre-flight (Soups §3.2) -------------------------------------------------------------------------
def inspect_pool(
    config: SoupConfig | str | os.PathLike | Mapping[str, Any],
    val_acc: Callable[[Mapping[str, Tensor]], float] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Each candidate's accuracy at `alphas` on the line from the best model to it, and the angle
    between their updates from the shared `init` (Soups §3.2); flags pairs whose midpoint collapses
    (an accuracy barrier: `barrier` or more below the worse endpoint, i.e. different basins)."""
    pool = open_pool(config, val_acc)
    cfg, ings = pool.config, pool.ingredients
    scorer = Scorer(pool.val_acc)
    accs = [
        scorer.state(open_ingredient(p), i, "ingredient")
        for i, p in enumerate(tqdm(ings, desc="ingredients", disable=not progress))
    ]
    best = int(np.argmax(accs))
    theta_b = open_ingredient(ings[best])
    floats = [k for k, v in theta_b.items() if v.is_floating_point()]  # integer buffers: θ_best's
    line = {ALL: floats}
    init = None
    if cfg.init is not None:
        init = (
            RenamedCheckpoint(cfg.init, pool.file_keys).open()
            if pool.file_keys
            else load_state_dict(cfg.init)
        )
    if init is not None:
        d_best = {k: theta_b[k].double() - init[k].double() for k in floats}
        norm_b = math.sqrt(sum(float(v.square().sum()) for v in d_best.values()))
    rows = []
    for i in tqdm([i for i in range(len(ings)) if i != best], desc="inspect", disable=not progress):
        theta = open_ingredient(ings[i])
        row = {"candidate": pool.names[i], "acc": accs[i]}
        for a in cfg.alphas:  # Ψ = (1-a)·θ_best + a·θ_i
            if pool.evaluator is not None:
                acc = pool.evaluator.mixed_accuracy(theta_b, theta, line, [1.0 - a])
            else:
                acc = pool.val_acc(interpolate(theta_b, theta, line, [1.0 - a]))
            row[f"acc@{a:g}"] = float(acc)
        if init is not None:
            dot = norm_i = 0.0
            for k in floats:
                d = theta[k].double() - init[k].double()
                dot, norm_i = dot + float((d * d_best[k]).sum()), norm_i + float(d.square().sum())
            cos = dot / max(math.sqrt(norm_i) * norm_b, 1e-300)
            row["angle_deg"] = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
        mid = (
            pool.val_acc(interpolate(theta_b, theta, line, [0.5]))
            if 0.5 not in cfg.alphas
            else row["acc@0.5"]
        )
        floor = min(accs[best], accs[i])
        row["collapse"] = bool(mid <= floor - cfg.barrier)
        rows.append(row)
        del theta
    table = pd.DataFrame(rows)
    table.attrs["best"] = pool.names[best]
    table.attrs["best_acc"] = accs[best]
    return table


# -- the CLI (registered in mmsoup.cli) --------------------------------------------------------------
def cmd_soup(args) -> None:
    """`mmsoup soup --config soup.yaml`: flags override the config's keys."""
    over = {"out": args.out, "shard_size": args.shard_size, "device": args.device}
    over["recipes"] = args.recipe
    cfg = load_config(
        args.config, {k: (str(v) if k == "out" and v else v) for k, v in over.items()}
    )
    _shard_size(cfg.shard_size)
    results = soup_from_config(cfg)
    for recipe in cfg.recipes:
        print(f"{recipe:16s} {results[recipe].val_acc:.4f}  {results['files'][recipe]}")
    print(f"model card       {Path(cfg.out) / 'MODEL_CARD.md'}")


def cmd_inspect(args) -> None:
    """`mmsoup inspect --config soup.yaml`: the pre-flight table."""
    table = inspect_pool(load_config(args.config, {"device": args.device}))
    print(f"best: {table.attrs['best']} ({table.attrs['best_acc']:.4f})")
    print(table.to_string(index=False))
    flagged = table[table["collapse"]]["candidate"].tolist() if len(table) else []
    if flagged:
        print(
            f"midpoint collapses (different basins; leave out or expect them rejected): {', '.join(flagged)}"
        )
