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
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from mmsoup import recipes
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
from mmsoup.factories import FAMILIES, create_model
from mmsoup.io import atomic_path, check_writable, write_json, write_text
from mmsoup.mixing import interpolate
from mmsoup.model_card import model_card
from mmsoup.progress import tqdm
from mmsoup.result import ALL, Scorer, SoupResult

BN_MODES = ("none", "final", "each")
MAX_CONFIG_BYTES = 1_000_000  # a soup config is a few lines; a bigger file is not one
SHOW = 200  # characters of a value echoed in a message, at most

Kind = type | tuple[type, ...]
Rule = tuple[Kind, Callable[[Any], bool], str]  # type, check, what is allowed (as FIELD_RULES)


def _known_recipe(name: str) -> bool:
    try:
        recipes.recipe(name)
    except MMSoupError:
        return False
    return True


def _known_optimizer(name: str) -> bool:
    import nevergrad as ng

    return name in ng.optimizers.registry


def _partition_spec(spec: str) -> bool:
    """The syntax of a partition scheme (mmsoup.partition), checked before the model exists."""
    import re

    from mmsoup.partition import ALIASES

    base, _, modifier = spec.replace(" ", "").lower().partition("+")
    base = ALIASES.get(base, base)
    syntax = re.fullmatch(r"prefix:[1-9]\d*(:split)?|blocks:[1-9]\d*", base)
    return modifier in ("", "live") and syntax is not None


def _device(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def _size(value: str | int) -> bool:
    try:
        return (_shard_size(value) or 0) > 0
    except MMSoupError:
        return False


def _list_of(kind: type, ok: Callable[[Any], bool]) -> Callable[[list], bool]:
    return lambda items: all(_is_a(x, kind) and ok(x) for x in items)


INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


def _sides(value: int | list, low: int) -> bool:
    """A size in pixels: one integer, or [height, width]."""
    sides = value if isinstance(value, list) else [value]
    return len(sides) == (2 if isinstance(value, list) else 1) and all(
        _is_a(x, int) and low <= x <= 8192 for x in sides
    )


_NONEMPTY = (str, lambda v: v.strip() != "", "a non-empty string")
_FLAG = (bool, lambda v: True, "true or false")
# key -> (type, check, allowed); the defaults are DEFAULTS'. Paths are relative to the config's
# folder. The order is the one "valid keys" lists.
RULES: dict[str, Rule] = {
    "model": (str, lambda v: v.strip() != "", "a model name (see the README)"),
    "model_kwargs": (dict, lambda v: all(isinstance(k, str) for k in v), "a mapping of keyword arguments"),
    "trust_code": (*_FLAG[:2], "true or false (true: run the code the model names)"),
    "image_size": (int, lambda v: 1 <= v <= 8192, "an integer in 1..8192"),
    "ingredients": ((list, str), lambda v: True, "a path or glob, or a list of them"),
    "init": _NONEMPTY,
    "held_out": _NONEMPTY,
    "test": (str, lambda v: v.strip() != "", "a test set: an ImageFolder directory or a .pt/.npz file"),
    "classes": (list, lambda v: len(v) >= 2 and _list_of(str, bool)(v) and len(set(v)) == len(v),
                "a list of at least 2 distinct class folder names, in the model's label order"),
    "recipes": (list, lambda v: len(v) >= 1 and _list_of(str, _known_recipe)(v),
                f"a non-empty list of recipes: {recipes.vocabulary()}"),
    "partition": (str, _partition_spec, "a partition scheme: C8, C15, C26, prefix:D, prefix:D:split or blocks:N, optionally +live"),
    "mms": (dict, lambda v: True, "a mapping of MMS options"),
    "learned": (dict, lambda v: True, "a mapping of learned-soup options"),
    "preprocess": (dict, lambda v: True, "a mapping of image preprocessing options (resize, crop, interpolation, mean, std)"),
    "bn_recalibration": (str, lambda v: v in BN_MODES, f"one of {', '.join(BN_MODES)}"),
    "batch_size": (int, lambda v: 1 <= v <= 1_000_000, "an integer in 1..1000000"),
    "device": (str, _device, "a torch device such as cpu, cuda or cuda:1"),
    "out": _NONEMPTY,
    "shard_size": ((str, int), _size, "a size > 0 in bytes or such as '500MB' or '2GB'"),
    # inspect: the points on the line to the best model, and the collapse threshold
    "alphas": (list, _list_of(float, lambda a: math.isfinite(a) and 0 <= a <= 1), "a list of numbers in [0, 1]"),
    "barrier": (float, lambda v: 0 <= v <= 1, "a number in [0, 1], e.g. 0.05"),
}  # fmt: skip
DEFAULTS: dict[str, Any] = {
    "model_kwargs": {},
    "trust_code": False,
    "recipes": ["uniform", "greedy", "mms"],
    "partition": "blocks:4",
    "mms": {},
    "learned": {},
    "preprocess": {},
    "bn_recalibration": "none",
    "batch_size": 256,
    "out": "soup",
    "alphas": [0.25, 0.5, 0.75],
    "barrier": 0.05,  # inspect: a midpoint this far below both ends collapses
}
KEYS = tuple(RULES)
SECTIONS: dict[str, dict[str, Rule]] = {
    "mms": {
        "budget": (int, lambda v: 1 <= v <= 100_000, "an integer in 1..100000 (evaluations per candidate)"),
        "tau": (float, lambda v: 0 <= v <= 1, "a number in [0, 1], e.g. 0.998"),
        "optimizer": (str, _known_optimizer, "a nevergrad optimizer name such as NGOpt, Cobyla or CMA"),
        "seed": (int, lambda v: 0 <= v < 2**32, "an integer in 0..2**32-1"),
        "variant": (str, lambda v: v in ("paper", "author"), "paper or author"),
        "bounds": (str, lambda v: v in ("unit", "author"), "unit or author"),
        "budget_per_component": (int, lambda v: 1 <= v <= 100_000, "an integer in 1..100000"),
        "accept_ties": _FLAG,
        "refine": _FLAG,
    },
    "learned": {
        "epochs": (int, lambda v: 1 <= v <= 10_000, "an integer in 1..10000"),
        "lr": (float, lambda v: v > 0, "a number > 0, e.g. 0.05"),
        "batch_size": (int, lambda v: 1 <= v <= 1_000_000, "an integer in 1..1000000"),
        "temperature": _FLAG,
        "seed": (int, lambda v: 0 <= v < 2**32, "an integer in 0..2**32-1"),
    },
    # ImageFolder images (held_out, test): PIL image -> resize -> centre crop -> tensor -> normalise
    "preprocess": {
        "resize": ((int, list), lambda v: _sides(v, 1), "an integer in 1..8192 (the shorter side) or [height, width]"),
        "crop": ((int, list), lambda v: _sides(v, 1), "an integer in 1..8192 (a centre square) or [height, width]"),
        "interpolation": (str, lambda v: v in INTERPOLATIONS, f"one of {', '.join(INTERPOLATIONS)}"),
        "mean": (list, lambda v: len(v) == 3 and _list_of(float, math.isfinite)(v), "a list of 3 numbers (R, G, B), e.g. [0.485, 0.456, 0.406]"),
        "std": (list, lambda v: len(v) == 3 and _list_of(float, lambda x: math.isfinite(x) and x > 0)(v), "a list of 3 numbers > 0 (R, G, B), e.g. [0.229, 0.224, 0.225]"),
    },
}  # fmt: skip
_PATHS = ("init", "held_out", "test", "out")


def _is_a(value: Any, kind: Kind) -> bool:
    """YAML's types: a bool is a bool only, an int is also a float."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, tuple({*kinds, int} if float in kinds else kinds))


def _show(value: Any) -> str:
    """repr(value), at most SHOW characters: a message never echoes a whole document."""
    text = repr(value)
    return text if len(text) <= SHOW else text[: SHOW - 3] + "..."


def check_rules(values: Mapping[str, Any], rules: Mapping[str, Rule], where: str) -> None:
    """Refuse an unknown key, a value of the wrong type or out of range (`rules`), in one sentence
    naming the key, its value and what is allowed (as FinetuneConfig does with FIELD_RULES)."""
    unknown = [k for k in values if k not in rules]
    if unknown:
        raise MMSoupError(
            f"{where} has the unknown key {_show(unknown[0])}; valid keys: {', '.join(rules)}."
        )
    for key, value in values.items():
        kind, ok, allowed = rules[key]
        if value is None:
            continue  # the default
        if not _is_a(value, kind):
            raise MMSoupError(
                f"{where}: {key}={_show(value)} has the wrong type ({type(value).__name__}); use {allowed}."
            )
        if (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
            problem = {str: "not known", int: "out of range", float: "out of range"}
            why = problem.get(type(value), "not valid")
            raise MMSoupError(f"{where}: {key}={_show(value)} is {why}; use {allowed}.")


@dataclass
class SoupConfig:
    """A validated soup config: the keys of RULES, paths resolved, and the file's text verbatim."""

    values: dict[str, Any]
    ingredients: list[str]
    text: str = ""
    source: str = "<dict>"
    overrides: dict[str, Any] = field(default_factory=dict)
    base: str = ""  # the config's folder: files are named relative to it in messages

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["values"][key]
        except KeyError:
            raise AttributeError(key) from None

    def shown(self, path: str | os.PathLike) -> str:
        """A path as the config names it: relative to its folder when inside it."""
        return _shown(path, self.base or os.curdir)


def _read_yaml(path: Path) -> tuple[Any, str]:
    """A config file's mapping and text: UTF-8, bounded, no aliases/anchors (an alias bomb
    expands a few lines into gigabytes), refused in one sentence that never echoes the file."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
                raise MMSoupError(
                    f"Config {path} uses the YAML {'alias' if sign == '*' else 'anchor'} "
                    f"{sign}{str(event.anchor)[:40]} (line {event.start_mark.line + 1}); aliases and "
                    "anchors are refused (they can expand a small file without bound), write the values out."
                )
            return super().compose_node(parent, index)

    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise MMSoupError(
            f"Config {path} is {size} bytes, more than a soup config's {MAX_CONFIG_BYTES}; pass the YAML config file."
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MMSoupError(
            f"Config {path} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); save it as UTF-8."
        ) from e
    try:
        return yaml.load(text, Loader=NoAliases), text  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        problem = " ".join(str(e).split())
        raise MMSoupError(
            f"Config {path} is not valid YAML ({problem[:SHOW]}); fix its syntax."
        ) from e
    except RecursionError as e:
        raise MMSoupError(
            f"Config {path} nests too deeply to be a soup config; write it as a flat mapping of keys."
        ) from e


def load_config(
    config: str | os.PathLike | Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> SoupConfig:
    """Read and check a soup config (a YAML file or a dict); `overrides` (CLI flags) win over keys.

    Every key and value is checked here (RULES, SECTIONS), before anything is built or imported:
    code named by the config runs only with `trust_code` (`factories.check_trust`)."""
    if isinstance(config, Mapping):
        raw, text, source, base = dict(config), "", "<dict>", Path.cwd()
    else:
        path = Path(config).expanduser()
        if not path.is_file():
            raise MMSoupError(f"Config {path} does not exist; check the path.")
        source, base = str(path), path.parent
        raw, text = _read_yaml(path)
        if not isinstance(raw, dict):
            raise MMSoupError(f"Config {path} must be a YAML mapping of keys (model:, ...).")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    raw |= given
    check_rules(raw, RULES, f"Config {source}")
    values = {k: raw[k] if raw.get(k) is not None else deepcopy(DEFAULTS.get(k)) for k in RULES}
    for section, rules in SECTIONS.items():
        check_rules(values[section], rules, f"Config {source}, {section}")
        values[section] = {k: v for k, v in values[section].items() if v is not None}
    keys = [recipes.recipe(r).key for r in values["recipes"]]  # one spelling: the recipe's key
    values["recipes"] = list(dict.fromkeys(keys))
    for key in ("model", "ingredients"):
        if values[key] is None:
            raise MMSoupError(f"Config {source} lacks the key {key!r}; add it (see the README).")
    for key in _PATHS:
        if values[key] is not None:
            values[key] = str(base / Path(values[key]).expanduser())
    if values["model"].startswith((".", "/", "~")):  # a model folder, relative to the config
        values["model"] = str(base / Path(values["model"]).expanduser())
    _check_classes(values, source)
    from mmsoup.factories import check_name, check_trust

    check_trust(values["model"], values["model_kwargs"], values["trust_code"], f"Config {source}: ")
    check_name(values["model"])
    for r in map(recipes.recipe, values["recipes"]):
        if "anchor" in r.needs and values["init"] is None:
            raise MMSoupError(
                f"Config {source}: recipe {r.name!r} needs the weights every ingredient was fine-tuned from; add init: (a checkpoint path)."
            )
    ingredients = _ingredients(values["ingredients"], base, source)
    _check_out(values, base, source)
    return SoupConfig(values, ingredients, text, source, given, str(base))


def _check_classes(values: Mapping[str, Any], source: str) -> None:
    """`classes:` and model_kwargs' num_classes, when both are given, agree."""
    n, classes = values["model_kwargs"].get("num_classes"), values["classes"]
    if classes is not None and _is_a(n, int) and n != len(classes):
        raise MMSoupError(
            f"Config {source} lists {len(classes)} classes but model_kwargs has num_classes={n}; make them agree."
        )


def _ingredients(entries: list[str] | str, base: Path, source: str) -> list[str]:
    """Checkpoint paths: each entry a path or a glob pattern, relative to the config's folder;
    at least two distinct files (one model is no soup)."""
    paths: list[str] = []
    entries = [entries] if isinstance(entries, str) else entries
    if not entries:
        raise MMSoupError(
            f"Config {source} has no ingredients; list two or more checkpoints (paths or globs) under ingredients:."
        )
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise MMSoupError(
                f"Config {source}: ingredient {_show(entry)} is not a path; list paths or globs as strings."
            )
        pattern = str(base / Path(entry).expanduser())
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found or not os.path.lexists(found[0]):
            raise MMSoupError(
                f"Config {source}: ingredient {_show(entry)} matches no file ({pattern}); check the path."
            )
        paths += found
    seen: dict[str, str] = {}
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            raise MMSoupError(
                f"Config {source}: ingredient {p} is listed twice (also as {seen[real]}); list each checkpoint once."
            )
        seen[real] = p
    if len(paths) == 1:
        raise MMSoupError(
            f"Config {source}: the ingredients are only {_shown(paths[0], base)}, and one model is no soup (nothing would be mixed); list two or more checkpoints."
        )
    return paths


def _outputs(values: Mapping[str, Any]) -> list[Path]:
    """Every path `soup` writes under `out` (each soup as a file, a folder of shards, a sidecar)."""
    out = Path(values["out"])
    names = ["MODEL_CARD.md"]
    for r in values["recipes"]:
        names += [f"{r}.safetensors", f"{r}.json", r, f"{r}/model.safetensors.index.json"]
    return [out] + [out / n for n in names]


def _shown(path: str | os.PathLike, base: str | os.PathLike) -> str:
    """A path as the config names it: relative to the config's folder when inside it."""
    rel = os.path.relpath(os.fspath(path), base)
    return os.fspath(path) if rel.startswith(os.pardir) else rel


def _matches(pattern: str, path: Path) -> bool:
    """Whether glob.glob(pattern) would list `path` (component by component, as glob matches)."""
    from fnmatch import fnmatchcase

    want, got = Path(pattern).parts, path.parts
    return len(want) == len(got) and all(fnmatchcase(g, w) for w, g in zip(want, got))


def _check_out(values: Mapping[str, Any], base: Path, source: str) -> None:
    """`out` must not lie among the ingredients: a second run would soup the first run's soups."""
    entries = values["ingredients"]
    for entry in [entries] if isinstance(entries, str) else entries:
        pattern = os.path.normpath(base / Path(entry).expanduser())
        for path in _outputs(values):
            if _matches(pattern, Path(os.path.normpath(path))):
                raise MMSoupError(
                    f"Config {source}: out {_shown(values['out'], base)} lies inside the ingredients' {_show(entry)} "
                    "(a second run would soup the first run's soups); pick an out folder outside it."
                )


# -- held-out data --------------------------------------------------------------------------------
def check_held_out_classes(
    path: str | os.PathLike,
    classes: list[str] | None,
    num_classes: int | None,
    what: str = "Held-out",
) -> list[str] | None:
    """An ImageFolder's class folders are the model's classes (`classes:` in order, or
    `num_classes` of them): a missing folder would shift every later label. Returns the classes
    in label order (None: not a folder)."""
    path = Path(path)
    if not path.is_dir():
        return None
    from torchvision.datasets.folder import find_classes

    try:
        found = find_classes(str(path))[0]
    except FileNotFoundError as e:
        raise MMSoupError(
            f"{what} folder {path} is not an ImageFolder ({e}); use one folder per class of images."
        ) from e
    if classes is not None:
        missing = [c for c in classes if c not in found]
        extra = [c for c in found if c not in classes]
        if missing or extra:
            problem = (
                f"lacks the class folder {missing[0]!r}"
                if missing
                else f"has the folder {extra[0]!r}"
            )
            raise MMSoupError(
                f"{what} folder {path} {problem} ({len(missing)} missing, {len(extra)} not in classes:); "
                "its class folders must be exactly the config's classes."
            )
        return list(classes)
    if num_classes is not None and len(found) != num_classes:
        raise MMSoupError(
            f"{what} folder {path} has {len(found)} class folders but the model has num_classes={num_classes} "
            "(a missing folder shifts every later label); add the missing folders or list the model's classes under classes:."
        )
    return found


def load_held_out(
    path: str | os.PathLike,
    transform: Callable | None,
    classes: list[str] | None = None,
    what: str = "Held-out",
) -> tuple[Tensor, Tensor]:
    """(inputs, labels) of an ImageFolder directory (the model's own preprocessing; `classes`:
    the folder names in label order, else sorted) or a tensor file (`.pt`/`.npz` with `images` or
    `inputs`, and `labels`); refused in one sentence if it cannot be a held-out set."""
    path = Path(path)
    if path.is_dir():
        from torchvision.datasets import ImageFolder

        if transform is None:
            raise MMSoupError(
                f"No image preprocessing is known for this model; set preprocess: in the config or pass a tensor file instead of {path}."
            )

        class Folder(ImageFolder):
            def find_classes(self, directory):
                if classes is None:
                    return super().find_classes(directory)
                return list(classes), {c: i for i, c in enumerate(classes)}

        try:
            data = Folder(str(path), transform=transform)
        except (FileNotFoundError, RuntimeError) as e:
            raise MMSoupError(
                f"{what} folder {path} is not an ImageFolder ({e}); use one folder per class of images."
            ) from e
        pairs = [
            data[i] for i in tqdm(range(len(data)), desc=f"{what.lower()} images", leave=False)
        ]
        inputs, labels = torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])
        _check_held_out(inputs, labels, path, what)
        return inputs, labels
    if not path.is_file():
        raise MMSoupError(f"{what} data {path} does not exist; check the path.")
    if path.suffix not in (".npz", ".pt", ".pth"):
        raise MMSoupError(
            f"{what} data {path} has suffix {path.suffix!r}; pass an ImageFolder directory, .pt or .npz."
        )
    import pickle
    import zipfile

    try:
        if path.suffix == ".npz":
            with np.load(path) as f:  # allow_pickle=False: an object array is refused
                data = {k: torch.from_numpy(f[k]) for k in f.files}
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, ValueError) as e:
        if "allow_pickle" in str(e) or "GLOBAL" in str(e) or "weights_only" in str(e).lower():
            raise MMSoupError(
                f"{what} data {path} is refused: it holds pickled objects, which would run code "
                "(only tensors and arrays are read); re-save it with plain tensors or numeric arrays."
            ) from e
        raise MMSoupError(
            f"{what} data {path} is truncated or corrupt ({type(e).__name__}); re-save it."
        ) from e
    except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, TypeError) as e:
        raise MMSoupError(
            f"{what} data {path} is truncated or corrupt ({type(e).__name__}); re-save it."
        ) from e
    inputs = data.get("images", data.get("inputs")) if isinstance(data, Mapping) else None
    if inputs is None or "labels" not in data:
        raise MMSoupError(
            f"{what} data {path} must hold 'images' (or 'inputs') and 'labels'; re-save it as such a mapping."
        )
    try:
        inputs, labels = torch.as_tensor(inputs), torch.as_tensor(data["labels"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise MMSoupError(
            f"{what} data {path}: images and labels must be numeric tensors or arrays ({type(e).__name__}); re-save them."
        ) from e
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise MMSoupError(
            f"{what} data {path}: labels must be integer class indices, got {labels.dtype} fractions; re-save them."
        )
    _check_held_out(inputs, labels.long(), path, what)
    return inputs, labels.long()


def _check_held_out(inputs: Tensor, labels: Tensor, path: Path, what: str = "Held-out") -> None:
    """As many labels as inputs, inputs finite and not all one value (a blank or broken export)."""
    if labels.ndim != 1 or len(labels) != len(inputs):
        raise MMSoupError(
            f"{what} data {path} has {len(inputs)} inputs but labels of shape {tuple(labels.shape)}; "
            "give one label per input."
        )
    if not len(inputs):
        return  # the Evaluator's own sentence: an empty held-out set
    flat = inputs.reshape(len(inputs), -1)
    if flat.is_floating_point():
        bad = (~torch.isfinite(flat)).any(dim=1)
        if bad.any():
            raise MMSoupError(
                f"{what} data {path}: {int(bad.sum())} of {len(inputs)} inputs hold NaN or Inf values "
                f"(the first: #{int(bad.nonzero()[0])}); re-export the held-out set."
            )
    if bool((flat == flat[0, 0]).all()):
        raise MMSoupError(
            f"{what} data {path}: every input holds the same value {flat[0, 0].item()!r}, so no "
            "model can be told apart on it; re-export the held-out set."
        )


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
    test: Evaluator | None = None  # the optional test set: each soup scored once, after it is built
    preprocess: str | None = None  # what was applied to ImageFolder images (one line)
    hf_folder: Path | None = None  # a Hugging Face model folder: its config beside each soup

    @property
    def evaluator(self) -> Evaluator | None:
        return self.val_acc if isinstance(self.val_acc, Evaluator) else None

    @property
    def names(self) -> list[str]:
        return [_name(p) for p in self.ingredients]

    @property
    def init(self) -> Any:
        """The checkpoint every ingredient was fine-tuned from (`init:`), under the model's key
        names; None when the config gives none."""
        if self.config.init is None:
            return None
        return (
            RenamedCheckpoint(self.config.init, self.file_keys)
            if self.file_keys
            else self.config.init
        )


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


def check_ingredients(cfg: SoupConfig, paths: list[str]) -> None:
    """Every ingredient's keys, shapes and dtypes (headers only, no tensor read, no code run)
    against the first's, before the first evaluation; the error names the offending file."""
    from mmsoup.checkpoints import read_spec

    first, name0 = read_spec(paths[0]), cfg.shown(paths[0])
    for path in paths[1:]:
        spec, name = read_spec(path), cfg.shown(path)
        missing, extra = sorted(first.keys() - spec.keys()), sorted(spec.keys() - first.keys())
        if missing or extra:
            what = (
                f"lacks the key {missing[0]!r}" if missing else f"has the unknown key {extra[0]!r}"
            )
            raise MMSoupError(
                f"{name} {what} ({len(missing)} missing, {len(extra)} unexpected) compared with {name0}; "
                "every ingredient must be a checkpoint of the same model."
            )
        for key, (shape, dtype) in spec.items():
            if shape != first[key][0]:
                raise MMSoupError(
                    f"{name}: {key!r} has shape {shape} but {name0} has {first[key][0]}; "
                    "every ingredient must be a checkpoint of the same model."
                )
            if dtype != first[key][1]:
                raise MMSoupError(
                    f"{name}: {key!r} has dtype {dtype} but {name0} has {first[key][1]}; "
                    "convert all checkpoints to one dtype."
                )


def open_pool(
    config: SoupConfig | str | os.PathLike | Mapping[str, Any],
    val_acc: Callable[[Mapping[str, Tensor]], float] | None = None,
) -> Pool:
    """Check every input (the config, every ingredient's header, the held-out classes), then build
    the model, check the checkpoints fit it, load the held-out set (or take `val_acc`)."""
    cfg = config if isinstance(config, SoupConfig) else load_config(config)
    check_writable(cfg.out, "out")
    if cfg.init is not None and not os.path.exists(cfg.init):
        raise MMSoupError(f"Config {cfg.source}: init {cfg.init} does not exist; check the path.")
    check_ingredients(cfg, cfg.ingredients)
    if val_acc is None and cfg.held_out is None:
        raise MMSoupError(
            f"Config {cfg.source} lacks 'held_out'; add an ImageFolder or tensor file (or pass val_acc from Python)."
        )
    classes = test_classes = None
    n = cfg.model_kwargs.get("num_classes")
    n = n if _is_a(n, int) else None
    if val_acc is None:
        if not os.path.exists(cfg.held_out):
            raise MMSoupError(f"Held-out data {cfg.held_out} does not exist; check the path.")
        classes = check_held_out_classes(cfg.held_out, cfg.classes, n)
    if cfg.test is not None:  # the same formats; an ImageFolder has the held-out's classes
        if not os.path.exists(cfg.test):
            raise MMSoupError(f"Test data {cfg.test} does not exist; check the path.")
        test_classes = check_held_out_classes(cfg.test, cfg.classes or classes, n, "Test")
    built = create_model(
        cfg.model, image_size=cfg.image_size, trust_code=cfg.trust_code, **cfg.model_kwargs
    )
    model = built.module
    ings, file_keys = _under_model_keys(cfg.ingredients, built.checkpoint_keys)
    _check_fits(model, ings[0], cfg)
    folders = [p for p in (cfg.held_out if val_acc is None else None, cfg.test) if p]
    transform, applied = built.transform, None
    if any(os.path.isdir(p) for p in folders):
        transform, applied = image_preprocessing(built, cfg)
        print(f"mmsoup: preprocess: {applied}", file=sys.stderr, flush=True)
    test = None
    if cfg.test is not None:
        x, y = load_held_out(cfg.test, transform, test_classes, "Test")
        test = Evaluator(model, x, y, device=cfg.device, batch_size=cfg.batch_size)
    extra = {"test": test, "preprocess": applied, "hf_folder": hf_model_folder(cfg.model)}
    if val_acc is not None:
        return Pool(cfg, model, ings, val_acc, None, file_keys, **extra)
    images, labels = load_held_out(cfg.held_out, transform, classes)
    recal = cfg.bn_recalibration == "each" and bn_statistics(model)
    kind = RecalibratingEvaluator if recal else Evaluator
    ev = kind(model, images, labels, device=cfg.device, batch_size=cfg.batch_size)
    return Pool(cfg, model, ings, ev, images[:1], file_keys, **extra)


# -- preprocessing of ImageFolder images ---------------------------------------------------------
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # timm's defaults
_OWN = {family.source: family.preprocessing for family in FAMILIES}  # its transform's origin


def _pair(value: Any, square: bool = False) -> list[int] | int:
    """A size: one integer (a resize's shorter side), or [height, width]; `square`: an equal
    pair as one integer (a centre crop is the same either way)."""
    if isinstance(value, int):
        return value
    sides = [int(v) for v in value]
    return sides[0] if len(sides) == 1 or (square and sides[0] == sides[1]) else sides


def own_preprocessing(transform: Any) -> dict[str, Any] | None:
    """resize, crop, interpolation, mean and std of a model's own transform (a torchvision
    Compose from timm/open_clip, or a Hugging Face image processor); None when unknown."""
    processor = getattr(transform, "processor", None)
    if processor is not None:  # transformers: an image processor
        out: dict[str, Any] = {}
        size = getattr(processor, "size", None) or {}
        size = dict(size) if not isinstance(size, int) else {"shortest_edge": size}
        if getattr(processor, "do_resize", True) and size:
            if "shortest_edge" in size:
                out["resize"] = int(size["shortest_edge"])
            elif "height" in size and "width" in size:
                out["resize"] = _pair([size["height"], size["width"]])
            sample = getattr(processor, "resample", None)
            name = getattr(sample, "name", None) or {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos", 4: "box", 5: "hamming"}.get(sample)  # fmt: skip
            out["interpolation"] = str(name).lower() if name else "bilinear"
        crop = getattr(processor, "crop_size", None)
        if getattr(processor, "do_center_crop", False) and crop:
            pair = [crop["height"], crop["width"]] if isinstance(crop, Mapping) else int(crop)
            out["crop"] = _pair(pair, square=True)
        if getattr(processor, "do_normalize", True) and getattr(processor, "image_mean", None):
            out["mean"] = [float(v) for v in processor.image_mean]
            out["std"] = [float(v) for v in processor.image_std]
        return out
    steps = getattr(transform, "transforms", None)
    if steps is None:
        return None
    from torchvision import transforms as T

    out = {}
    for step in steps:
        if isinstance(step, T.Resize):
            out["resize"] = _pair(step.size)
            out["interpolation"] = str(getattr(step.interpolation, "value", step.interpolation))
        elif isinstance(step, T.CenterCrop):
            out["crop"] = _pair(step.size, square=True)
        elif isinstance(step, T.Normalize):
            out["mean"] = [float(v) for v in step.mean]
            out["std"] = [float(v) for v in step.std]
    return out


def describe_preprocessing(p: Mapping[str, Any]) -> str:
    """One line: resize 36 (bicubic), centre crop 32, mean (...), std (...)."""

    def size(v: Any) -> str:
        return f"{v[0]}x{v[1]}" if isinstance(v, list) else str(v)

    def nums(v: Any) -> str:
        return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"

    parts = []
    if p.get("resize") is not None:
        how = "to" if isinstance(p["resize"], list) else "shorter side to"
        parts.append(f"resize {how} {size(p['resize'])} ({p.get('interpolation', 'bilinear')})")
    else:
        parts.append("no resize")
    parts.append(f"centre crop {size(p['crop'])}" if p.get("crop") is not None else "no crop")
    if p.get("mean") is not None:
        parts.append(f"mean {nums(p['mean'])}, std {nums(p['std'])}")
    else:
        parts.append("no normalisation (pixels in [0, 1])")
    return ", ".join(parts)


def image_preprocessing(built: Any, cfg: SoupConfig) -> tuple[Callable | None, str]:
    """The transform of ImageFolder images and one line saying what it is: the config's
    `preprocess:` (keys not given: the model's own, else defaults) or the model's own."""
    given = dict(cfg.preprocess)
    own = own_preprocessing(built.transform) if built.transform is not None else None
    where = _OWN.get(built.source, "the model's own")
    if not given:
        if built.transform is None:
            return None, "none known for this model (set preprocess: in the config)"
        if own is None:
            return built.transform, where
        return built.transform, f"{describe_preprocessing(own)}; {where}"
    params = dict(own or {}) | given
    if "resize" not in params and "crop" not in params:
        side = cfg.image_size
        if side is None:
            raise MMSoupError(
                f"Config {cfg.source}: preprocess has no resize or crop and model {cfg.model!r} "
                "has no preprocessing of its own; add preprocess: {resize: N, crop: N} (or image_size)."
            )
        params["resize"] = params["crop"] = side
    if params.get("mean") is None or params.get("std") is None:  # ImageNet's, as timm's default
        params.setdefault("mean", list(IMAGENET[0]))
        params.setdefault("std", list(IMAGENET[1]))
        params["mean"] = params["mean"] or list(IMAGENET[0])
        params["std"] = params["std"] or list(IMAGENET[1])
    params.setdefault("interpolation", "bilinear")
    from torchvision import transforms as T

    steps: list[Any] = [T.Lambda(lambda img: img.convert("RGB"))]
    mode = T.InterpolationMode(params["interpolation"])
    if params.get("resize") is not None:
        steps.append(T.Resize(params["resize"], interpolation=mode))
    if params.get("crop") is not None:
        steps.append(T.CenterCrop(params["crop"]))
    steps.append(T.ToTensor())
    if params.get("mean") is not None:
        steps.append(T.Normalize(params["mean"], params["std"]))
    rest = sorted(set(params) - set(given))
    source = "the config's preprocess:" + (
        f" (the rest, {', '.join(rest)}: {where})" if own and rest else ""
    )
    return T.Compose(steps), f"{describe_preprocessing(params)}; {source}"


def hf_model_folder(model: str) -> Path | None:
    """The Hugging Face model folder a config's model names (a folder with config.json, or an
    hf:ORG/NAME snapshot of the local cache), else None."""
    from mmsoup.factories import _hub_folder

    kind, sep, rest = str(model).partition(":")
    folder = _hub_folder(rest) if kind == "hf" and sep else Path(str(model)).expanduser()
    return folder if (folder / "config.json").is_file() else None


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
    mode = pool.config.bn_recalibration
    ev.load(result.state_dict)
    before = Evaluator.accuracy(ev)  # the soup's mixed statistics
    t0 = time.perf_counter()
    recalibrate(ev)
    seconds = time.perf_counter() - t0
    live = ev.model.state_dict()
    after = Evaluator.accuracy(ev)
    # final: the recalibrated statistics only if they do not lower held-out accuracy (they
    # can: the held-out batches are few, or their class mix differs). each: the search scored
    # every candidate recalibrated, so the soup it chose is kept as it was scored.
    kept = "recalibrated" if mode == "each" or after >= before else "mixed"
    if kept == "recalibrated":
        for k in keys:
            result.state_dict[k] = live[k].detach().to("cpu", copy=True)
    result.info["bn_recalibration"] = {
        "mode": mode,
        "acc_mixed_statistics": before,
        "acc_recalibrated": after,
        "kept": kept,
        "seconds_final": seconds,
        "seconds_during_search": _bn_spent(pool)[0] - since[0],
        "recalibrations_during_search": _bn_spent(pool)[1] - since[1],
    }
    result.val_acc = after if kept == "recalibrated" else before


def run_recipes(pool: Pool, progress: bool = True) -> dict[str, Any]:
    """Rank the ingredients once, then build each requested recipe of the registry
    (`mmsoup.recipes`; Soups §2, Recipe 1; MMS Alg. 1), each from the same recipe pool."""
    from mmsoup.partition import partition

    cfg, ings, n = pool.config, pool.ingredients, len(pool.ingredients)
    scorer = Scorer(pool.val_acc)
    bar = tqdm(ings, desc="ingredients", disable=not progress)
    accs = [scorer.state(open_ingredient(p), i, "ingredient") for i, p in enumerate(bar)]
    wanted = [recipes.recipe(key) for key in cfg.recipes]
    rpool = recipes.Pool(
        ingredients=ings,
        heldout=pool.val_acc,
        val_accs=accs,
        anchor=pool.init,
        scheme=cfg.partition,
        partition=lambda scheme: partition(pool.model, scheme, example_input=pool.example_input),
        mms={**cfg.mms, "warn": True},  # one sentence first when τ cannot pass (mms_warning)
        learned=cfg.learned,
        progress=progress,
    )
    for r in wanted:  # what a recipe lacks: one sentence before any soup is built
        r.check(
            rpool,
            " (from Python, pass no val_acc to use held_out:)" if pool.evaluator is None else "",
        )
    needs_parts = any("components" in r.needs and r.scheme is None for r in wanted)
    out: dict[str, Any] = {
        "ingredient_val_accs": accs,
        "ingredient_evals": n,
        "partition": rpool.components(None) if needs_parts else None,
    }
    if isinstance(pool.evaluator, RecalibratingEvaluator):  # mode each: ranking's share
        spent = _bn_spent(pool)
        out["ingredient_bn_recalibration"] = {"seconds": spent[0], "recalibrations": spent[1]}
    for r in wanted:
        since = _bn_spent(pool)
        res = r.build(rpool)
        if isinstance(res, SoupResult):
            order = pool.model.state_dict()  # the model's key order, whatever the files' order
            res.state_dict = {k: res.state_dict[k] for k in order}
            _finish_bn(pool, res, since)
        out[r.key] = res
    if pool.test is not None:  # each soup once, after it is built: the unbiased number
        for key in cfg.recipes:
            if isinstance(out[key], SoupResult):
                res = out[key]
                res.info["test"] = {
                    "set": cfg.shown(cfg.test),
                    "n": pool.test.n,
                    "acc": float(pool.test(res.state_dict)),
                    "note": "scored once after the soup was built; the held-out set chose it",
                }
    return out


# -- writing ---------------------------------------------------------------------------------------
HF_FILES = (  # a Hugging Face model folder's files that travel with its soups
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "image_processor_config.json", "video_preprocessor_config.json", "feature_extractor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.json",
)  # fmt: skip


def _write(
    result: SoupResult, path: Path, shard_size: str | int | None, extras: list[Path] | None = None
) -> Path:
    """The fused model as `.safetensors` + sidecar; a folder (model.safetensors, or shards with
    safetensors' index) with `extras` (a Hugging Face model's config.json, its processor's
    files) beside the weights when given, so `from_pretrained(folder)` loads it."""
    if shard_size is None and not extras:
        return result.save(path.with_suffix(".safetensors"))
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import save_file

    from mmsoup.io import public_dir

    folder = path.with_suffix("")
    meta = {k: getattr(result, k) for k in ("val_acc", "ingredients", "weights", "n_evals")}
    meta |= {"ingredient_val_accs": result.ingredient_val_accs, "trace": result.trace}
    state = {k: v.detach().cpu().contiguous() for k, v in result.state_dict.items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = public_dir(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        order = {KEY_ORDER: json.dumps(list(state))}
        if shard_size is None:
            save_file(state, tmp / "model.safetensors", metadata={"format": "pt", **order})
        else:
            save_torch_state_dict(state, tmp, max_shard_size=shard_size, metadata=order)
        for extra in extras or []:
            shutil.copyfile(extra, tmp / extra.name)
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
    results["preprocess"] = pool.preprocess
    out = Path(cfg.out)
    files = {}
    extras = None
    if pool.hf_folder is not None:  # beside the weights, so from_pretrained(folder) loads a soup
        extras = [pool.hf_folder / f for f in HF_FILES if (pool.hf_folder / f).is_file()]
    for recipe in cfg.recipes:
        res = results[recipe]
        if isinstance(res, SoupResult):
            if pool.file_keys:  # the soup under the checkpoints' own names, as they were saved
                back = {m: f for f, m in pool.file_keys.items()}
                res.state_dict = {back.get(k, k): v for k, v in res.state_dict.items()}
            files[recipe] = _write(res, out / recipe, shard_size, extras)
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
    # the angle between updates: parameters only; buffers (BatchNorm running statistics) are
    # recomputed from the data, not trained, and would pull every angle towards 0
    params = {name for name, _ in pool.model.named_parameters(remove_duplicate=False)}
    angled = [k for k in floats if k in params]
    init = None
    if cfg.init is not None:
        init = (
            RenamedCheckpoint(cfg.init, pool.file_keys).open()
            if pool.file_keys
            else load_state_dict(cfg.init)
        )
    if init is not None:
        d_best = {k: theta_b[k].double() - init[k].double() for k in angled}
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
            for k in angled:
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
    over |= {"recipes": args.recipe, "trust_code": True if args.trust_code else None}
    cfg = load_config(
        args.config, {k: (str(v) if k == "out" and v else v) for k, v in over.items()}
    )
    results = soup_from_config(cfg)
    for recipe in cfg.recipes:
        res = results[recipe]
        test = res.info.get("test") if isinstance(res, SoupResult) else None
        shown = f"  test {test['acc']:.4f}" if test else ""
        print(f"{recipe:16s} {res.val_acc:.4f}{shown}  {results['files'][recipe]}")
    print(f"model card       {Path(cfg.out) / 'MODEL_CARD.md'}")


def inspect_columns(config: SoupConfig, table: pd.DataFrame) -> list[str]:
    """What each column of the inspect table means (printed under it)."""
    notes = {
        "candidate": "a checkpoint other than the best one",
        "acc": "its own held-out accuracy",
        "acc@a": "held-out accuracy of (1-a)·best + a·candidate, every floating tensor interpolated "
        "(a = 0: the best model, a = 1: the candidate)",
        "angle_deg": "angle between the updates (candidate - init) and (best - init) from the "
        "shared init, over the parameters only (BatchNorm running statistics and other buffers "
        "left out); Soups §3.2: a larger angle, a larger gain from mixing",
        "collapse": f"the midpoint's accuracy is {config.barrier:g} (barrier) or more below the "
        "worse of the two models: a different basin",
    }
    cols = ["acc@a" if str(c).startswith("acc@") else str(c) for c in table.columns]
    return [f"  {c}: {notes[c]}" for c in dict.fromkeys(cols) if c in notes]


def cmd_inspect(args) -> None:
    """`mmsoup inspect --config soup.yaml`: the pre-flight table, each column explained."""
    over = {"device": args.device, "trust_code": True if args.trust_code else None}
    cfg = load_config(args.config, over)
    table = inspect_pool(cfg)
    print(f"best: {table.attrs['best']} ({table.attrs['best_acc']:.4f})")
    print(table.to_string(index=False))
    print("columns:")
    print("\n".join(inspect_columns(cfg, table)))
    flagged = table[table["collapse"]]["candidate"].tolist() if len(table) else []
    if flagged:
        print(
            f"midpoint collapses (different basins; leave out or expect them rejected): {', '.join(flagged)}"
        )
