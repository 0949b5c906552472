"""Every bad input gets one clear error: one table, one row per mistake a user can make.

Each row sets up the bad input under `tmp_path` and returns either CLI arguments (run through
`mmsoup.cli.main`) or a library call (run through a temporary CLI command, so that every row is
checked the same way). Every row must give exit status 2 and exactly one line on stderr,
`mmsoup: error: <one sentence>`, naming the file or argument and the fix, no traceback, and must
leave the folder as it was: no new, partial or temporary file.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import SafetensorError
from torch import nn

from mmsoup import cli
from mmsoup.checkpoints import save_state_dict
from mmsoup.errors import MMSoupError

Setup = Callable[[Path], "list[str] | Callable[[], object]"]
CASES: dict[str, tuple[Setup, tuple[str, ...]]] = {}


def case(name: str, *fragments: str) -> Callable[[Setup], Setup]:
    """Register a row: its setup and the fragments its message must contain (what, and the fix)."""

    def register(setup: Setup) -> Setup:
        CASES[name] = (setup, fragments)
        return setup

    return register


def _state(seed: int = 0, **change: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {
        "0.weight": torch.randn(4, 3, generator=g),
        "0.bias": torch.randn(4, generator=g),
        "2.weight": torch.randn(2, 4, generator=g),
    }
    return {k: v for k, v in (state | change).items() if v is not None}


def _pool(tmp: Path, second: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """Two checkpoints, a.safetensors and b.safetensors (b: `second` if given)."""
    a = save_state_dict(_state(0), tmp / "pool" / "a.safetensors")
    b = save_state_dict(second if second is not None else _state(1), tmp / "pool" / "b.safetensors")
    return [a, b]


def _uniform_soup_job(paths: list, tmp: Path) -> Callable[[], object]:
    """What a user runs: fuse the pool, save the soup to out/."""
    from mmsoup.soups import uniform_soup

    return lambda: save_state_dict(uniform_soup(paths), tmp / "out" / "soup.safetensors")


def _val_acc(state) -> float:
    return 0.5


def _mms_job(paths, tmp: Path, components=None, **kw) -> Callable[[], object]:
    from mmsoup.soups import manifold_mixing_soup

    comps = components or {"fc1": ["0.weight", "0.bias"], "fc2": ["2.weight"]}
    out = tmp / "out" / "mms.safetensors"
    return lambda: manifold_mixing_soup(paths, _val_acc, comps, progress=False, **kw).save(out)


# -- the pool: keys, shapes, dtypes, values ----------------------------------------------------
@case("mismatched key sets", "b.safetensors lacks key '2.weight'", "same architecture")
def _(tmp):
    return _uniform_soup_job(_pool(tmp, _state(1, **{"2.weight": None})), tmp)


@case("extra key", "b.safetensors has the extra key 'head.weight'", "same architecture")
def _(tmp):
    return _uniform_soup_job(_pool(tmp, _state(1, **{"head.weight": torch.ones(1)})), tmp)


@case("shape mismatch", "b.safetensors: '0.weight' has shape (5, 3)", "different architectures")
def _(tmp):
    return _uniform_soup_job(_pool(tmp, _state(1, **{"0.weight": torch.ones(5, 3)})), tmp)


@case(
    "dtype mismatch", "b.safetensors: '0.bias' has dtype torch.float16", "convert all checkpoints"
)
def _(tmp):
    half = _state(1, **{"0.bias": torch.ones(4, dtype=torch.float16)})
    return _uniform_soup_job(_pool(tmp, half), tmp)


@case("NaN weights", "b.safetensors: '0.bias' holds NaN or Inf", "leave it out of the pool")
def _(tmp):
    return _uniform_soup_job(
        _pool(tmp, _state(1, **{"0.bias": torch.full((4,), float("nan"))})), tmp
    )


@case("Inf weights", "b.safetensors: '2.weight' holds NaN or Inf", "leave it out of the pool")
def _(tmp):
    inf = torch.zeros(2, 4)
    inf[1, 2] = float("inf")
    return _uniform_soup_job(_pool(tmp, _state(1, **{"2.weight": inf})), tmp)


@case("truncated checkpoint", "b.safetensors is truncated or corrupt", "re-download or re-save")
def _(tmp):
    paths = _pool(tmp)
    paths[1].write_bytes(paths[1].read_bytes()[:100])
    return _uniform_soup_job(paths, tmp)


@case("corrupt .pt checkpoint", "b.pt is truncated or corrupt", "re-download or re-save")
def _(tmp):
    paths = _pool(tmp)
    paths[1] = tmp / "pool" / "b.pt"
    paths[1].write_bytes(b"this is a text file, not a checkpoint\n" * 20)
    return _uniform_soup_job(paths, tmp)


@case("random bytes as .pt", "b.pt is truncated or corrupt (not a PyTorch checkpoint)", "re-save")
def _(tmp):
    paths = _pool(tmp)
    paths[1] = tmp / "pool" / "b.pt"
    paths[1].write_bytes(np.random.default_rng(0).bytes(500))
    return _uniform_soup_job(paths, tmp)


@case("pickle that runs code", "evil.pt is refused", "re-save it as a plain state dict")
def _(tmp):
    marker = tmp / "pwned"  # would appear in the folder if the payload ran: the snapshot sees it

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp / "pool" / "evil.pt"
    evil.parent.mkdir(parents=True)
    torch.save({"0.weight": torch.ones(4, 3), "x": Payload()}, evil)
    return _uniform_soup_job([evil], tmp)


@case("empty ingredient list", "ingredient list is empty", "pass at least one checkpoint")
def _(tmp):
    return _mms_job([], tmp)


@case("missing checkpoint file", "nope.safetensors does not exist", "check the path")
def _(tmp):
    return _uniform_soup_job([_pool(tmp)[0], tmp / "pool" / "nope.safetensors"], tmp)


# -- partitions, schemes, optimizers, profiles, parameters --------------------------------------
@case(
    "partition misses a key",
    "Key '2.weight' is missing from the partition",
    "add it to a component",
)
def _(tmp):
    from mmsoup.partition import validate_partition

    return lambda: validate_partition({"fc1": ["0.weight", "0.bias"]}, _state())


@case(
    "partition repeats a key", "Key '0.bias' is repeated", "each key must belong to one component"
)
def _(tmp):
    return _mms_job(_pool(tmp), tmp, {"fc1": ["0.weight", "0.bias"], "b": ["0.bias"]})


@case("partition names an unknown key", "names key '1.weight'", "check its spelling")
def _(tmp):
    return _mms_job(_pool(tmp), tmp, {"fc1": ["0.weight"], "x": ["1.weight"]})


@case("unknown partition scheme", "Unknown partition scheme 'C9'", "valid schemes: C8, C15, C26")
def _(tmp):
    from mmsoup.partition import partition

    return lambda: partition(_state(), "C9")


@case("unknown optimizer", "Unknown nevergrad optimizer 'Cobila'", "use a name from")
def _(tmp):
    return _mms_job(_pool(tmp), tmp, optimizer="Cobila")


@case("unknown MMS variant", "variant must be 'paper' or 'author'", "got 'authors'")
def _(tmp):
    return _mms_job(_pool(tmp), tmp, variant="authors")


@case("unknown profile", "Unknown profile 'tiny'", "pick one of embedded, smoke, paper")
def _(tmp):
    return ["sweep", "--profile", "tiny", "--run-dir", str(tmp / "out")]


@case("unknown profile (pretrain)", "Unknown profile 'papr'", "pick one of")
def _(tmp):
    return ["pretrain", "--profile", "papr", "--cache", str(tmp / "out")]


@case("unknown fine-tuning hyper-parameter", "hyper-parameter 'lrate'", "valid ones are")
def _(tmp):
    return ["finetune", "--config", '{"lrate": 0.1}', "--out", str(tmp / "out" / "m.safetensors")]


@case("unknown augmentation", "augment='heavy' is not known", "use one of minimal")
def _(tmp):
    return [
        "finetune",
        "--config",
        '{"augment": "heavy"}',
        "--out",
        str(tmp / "out" / "m.safetensors"),
    ]


@case(
    "unknown notebook parameter",
    "Notebook 02_soups has no parameter 'budjet'",
    "its parameters are",
)
def _(tmp):
    from mmsoup.reproduce import run_notebook

    return lambda: run_notebook("02_soups", {"budjet": 10}, tmp / "out", stream=False)


# -- every input checked before any work (configs, flags, paths) ------------------------------------
def _finetune(tmp: Path, config: str, *more: str) -> list[str]:
    """`finetune --config CONFIG` without --init: a late check would pretrain first (guarded)."""
    return ["finetune", "--config", config, "--out", str(tmp / "out" / "m.safetensors"), *more]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _sweep_file(tmp: Path, config: dict) -> Path:
    """A sweep file with one run (model_1) of `config`."""
    runs = [{"name": "model_1", "config": config}]
    sweep = {"format": "mmsoup-sweep/1", "out": ".", "init": "model_0.safetensors", "runs": runs}
    return _write(tmp / "sw" / "sweep.json", json.dumps(sweep))


@case(
    "config epochs 'abc' inline, checked before pretraining",
    "In --config, epochs='abc' has the wrong type",
    "integer",
)
def _(tmp):
    return ["finetune", "--config", '{"epochs": "abc"}']  # default --out: runs/ under tmp


@case(
    "config mixup_alpha 'x' in a file, checked before pretraining",
    "mixup_alpha='x' has the wrong type",
    "number >= 0",
)
def _(tmp):
    return [
        "finetune",
        "--config",
        str(_write(tmp / "c.json", '{"lr": 0.001, "mixup_alpha": "x"}')),
    ]


@case(
    "reproduce --out in /proc",
    "--out /proc/forbidden cannot be written",
    "a folder you can write",
)
def _(tmp):
    return ["reproduce", "--profile", "smoke", "--out", "/proc/forbidden"]


# Every field of FinetuneConfig: a value of the wrong type, and a value out of range.
BAD_VALUES: dict[str, tuple[object, object]] = {
    "lr": ("abc", 0),
    "weight_decay": (True, -0.1),
    "epochs": (2.5, 0),
    "label_smoothing": ("0.1", 1.0),
    "mixup_alpha": ([0.2], -1),
    "augment": (3, "heavy"),
    "randaug_m": (1.5, 31),
    "randaug_n": ("2", -1),
    "seed": (0.5, -1),
    "batch_size": ("64", 3),
    "warmup_frac": (None, 1.0),
    "train_images": (10.5, 1),
    "arch": (7, ""),
    "heldout_images": ("2000", 999),
}
MORE_BAD_VALUES = [("lr", float("nan")), ("lr", float("inf")), ("batch_size", 0),
                     ("randaug_m", -1), ("label_smoothing", -0.1), ("warmup_frac", -0.5),
                     ("arch", "vit-huge"), ("epochs", True)]  # fmt: skip


def _config_case(field: str, value: object, inline: bool) -> None:
    """A row: `finetune --config` with `field` set to `value`, inline JSON or from a file."""
    from mmsoup.finetune import FIELD_RULES

    @case(
        f"config {field}={value!r} ({'inline' if inline else 'file'})",
        f"In --config, {field}={value!r} ",  # the field and its bad value ...
        FIELD_RULES[field][2],  # ... and what is allowed
    )
    def _(tmp):
        text = json.dumps({field: value})  # NaN and Infinity too: Python's json reads them
        return _finetune(tmp, text if inline else str(_write(tmp / "config.json", text)))


for _field, (_wrong, _out_of_range) in BAD_VALUES.items():
    _config_case(_field, _wrong, inline=True)  # wrong types inline,
    _config_case(_field, _out_of_range, inline=False)  # out-of-range values from a file
for _field, _value in MORE_BAD_VALUES:
    _config_case(_field, _value, inline=True)


@case("config is not a JSON object", "--config must be a JSON object", "e.g.")
def _(tmp):
    return _finetune(tmp, "[1, 2]")


@case("config file missing", "--config file", "does not exist", "check the path")
def _(tmp):
    return _finetune(tmp, str(tmp / "nope.json"))


@case("config arch differs from the profile", "arch='ViT-B-32-quickgelu' differs", "pass --init")
def _(tmp):
    return _finetune(tmp, '{"arch": "ViT-B-32-quickgelu"}')


@case("finetune --init missing", "--init", "nope.safetensors does not exist", "check the path")
def _(tmp):
    return _finetune(tmp, "{}", "--init", str(tmp / "nope.safetensors"))


@case("finetune --out in /proc", "--out /proc/forbidden/m.safetensors cannot be written")
def _(tmp):
    return ["finetune", "--config", "{}", "--out", "/proc/forbidden/m.safetensors"]


@case("finetune --out is a folder", "--out", "is a folder", "pass a file path")
def _(tmp):
    (tmp / "out").mkdir()
    return ["finetune", "--config", "{}", "--out", str(tmp / "out")]


@case("finetune --sweep with --out", "--init and --out go with --config only")
def _(tmp):
    return ["finetune", "--sweep", str(_sweep_file(tmp, {})), "--run", "1", "--out", str(tmp / "m")]


@case("finetune --run out of range", "--run 3 is out of range", "runs 1..1")
def _(tmp):
    return ["finetune", "--sweep", str(_sweep_file(tmp, {})), "--run", "3"]


@case("finetune --run 0", "argument --run: '0' is not an integer >= 1", "--help")
def _(tmp):
    return ["finetune", "--sweep", str(_sweep_file(tmp, {})), "--run", "0"]


@case("sweep file holds a bad config", "sweep.json (model_1), lr=-1 is out of range", "> 0")
def _(tmp):
    return ["finetune", "--sweep", str(_sweep_file(tmp, {"lr": -1})), "--run", "1"]


@case("sweep file without runs", "has no valid list of runs", "re-create it")
def _(tmp):
    path = _write(tmp / "sw" / "sweep.json", '{"format": "mmsoup-sweep/1"}')
    return ["finetune", "--sweep", str(path), "--run", "1"]


@case("sweep --configs missing", "--configs", "does not exist", "check the path")
def _(tmp):
    return [
        "sweep",
        "--profile",
        "smoke",
        "--configs",
        str(tmp / "c.json"),
        "--run-dir",
        str(tmp / "o"),
    ]


@case("sweep --configs with a bad value", "c.json (run 2), epochs=0 is out of range", ">= 1")
def _(tmp):
    configs = _write(tmp / "c.json", json.dumps([{"lr": 1e-3}, {"epochs": 0}]))
    return ["sweep", "--profile", "smoke", "--configs", str(configs), "--run-dir", str(tmp / "o")]


@case("sweep --run-dir holds another sweep", "already holds a different sweep", "another --run-dir")
def _(tmp):
    _write(tmp / "o" / "sweep" / "sweep.json", json.dumps({"format": "mmsoup-sweep/1", "runs": []}))
    return ["sweep", "--profile", "smoke", "--run-dir", str(tmp / "o")]


@case("sweep --run-dir under a file", "--run-dir", "cannot be created because", "is a file")
def _(tmp):
    _write(tmp / "notes.txt", "a file, not a folder\n")
    return ["sweep", "--profile", "smoke", "--run-dir", str(tmp / "notes.txt" / "runs")]


@case("sweep --jobs 0", "argument --jobs: '0' is not an integer >= 1", "mmsoup sweep --help")
def _(tmp):
    return ["sweep", "--profile", "smoke", "--jobs", "0", "--run-dir", str(tmp / "o")]


@case("pretrain --threads abc", "argument --threads: 'abc' is not an integer >= 1", "--help")
def _(tmp):
    return ["pretrain", "--profile", "smoke", "--threads", "abc"]


@case("pretrain --cache in /proc", "--cache /proc/forbidden cannot be written", "you can write")
def _(tmp):
    return ["pretrain", "--profile", "smoke", "--cache", "/proc/forbidden"]


@case("unknown flag", "unrecognized arguments: --outt", "see `mmsoup --help`")
def _(tmp):
    return ["sweep", "--profile", "smoke", "--outt", str(tmp / "o")]


@case("profile override not an integer", "n_runs must be a positive integer, not 'x'")
def _(tmp):
    return ["sweep", "--profile", "smoke:n_runs=x", "--run-dir", str(tmp / "o")]


@case("profile override of a field that is not overridable", "'epochs' cannot be overridden")
def _(tmp):
    return ["sweep", "--profile", "smoke:epochs=3", "--run-dir", str(tmp / "o")]


@case("reproduce --run-dir under a file", "--run-dir", "is a file", "another path")
def _(tmp):
    _write(tmp / "notes.txt", "a file\n")
    return ["reproduce", "--profile", "smoke", "--run-dir", str(tmp / "notes.txt" / "run")]


@case("soup --run-dir in /proc", "--run-dir /proc/forbidden cannot be written")
def _(tmp):
    return ["soup", "--profile", "smoke", "--run-dir", "/proc/forbidden"]


@case("evaluate --run-dir is a file", "--run-dir", "run is a file, not a folder", "pass a folder")
def _(tmp):
    return ["evaluate", "--profile", "smoke", "--run-dir", str(_write(tmp / "run", "x\n"))]


@case("replicate --root in /proc", "--root /proc/forbidden cannot be written")
def _(tmp):
    return ["replicate", "--profile", "smoke", "--root", "/proc/forbidden"]


@case("replicate --out in /proc", "--out /proc/forbidden cannot be written")
def _(tmp):
    return ["replicate", "--profile", "smoke", "--root", str(tmp / "r"), "--out", "/proc/forbidden"]


@case("replicate --index -1", "argument --index: '-1' is not an integer >= 0")
def _(tmp):
    return ["replicate", "--profile", "smoke", "--root", str(tmp / "r"), "--index", "-1"]


@case("replicate --replicates 1", "'1' is not an integer >= 2", "at least 2 replicates")
def _(tmp):
    return ["replicate", "--profile", "smoke", "--root", str(tmp / "r"), "--replicates", "1"]


@case(
    "replicate --summary-only without replicates",
    "--root",
    "does not exist",
    "run the replicates first",
)
def _(tmp):
    return ["replicate", "--profile", "smoke", "--root", str(tmp / "r"), "--summary-only"]


@case("data fetch --data-root in /proc", "--data-root /proc/forbidden cannot be written")
def _(tmp):
    return ["data", "fetch", "model_0", "--data-root", "/proc/forbidden"]


@case("distributed --tau out of range", "--tau 2.0 is out of range", "[0, 1]")
def _(tmp):
    pool = [str(p) for p in _pool(tmp)]
    return [
        "distributed",
        "--ingredients",
        *pool,
        "--tau",
        "2",
        "--out",
        str(tmp / "o" / "s.safetensors"),
    ]


@case("distributed --out in /proc", "--out /proc/forbidden/s.safetensors cannot be written")
def _(tmp):
    pool = [str(p) for p in _pool(tmp)]
    return ["distributed", "--ingredients", *pool, "--out", "/proc/forbidden/s.safetensors"]


@case("distributed --timeout 0", "--timeout 0.0 is out of range", "seconds > 0")
def _(tmp):
    pool = [str(p) for p in _pool(tmp)]
    out = str(tmp / "o" / "s.safetensors")
    return ["distributed", "--ingredients", *pool, "--timeout", "0", "--out", out]


@case("distributed ingredient missing", "--ingredients", "nope.safetensors does not exist")
def _(tmp):
    missing = str(tmp / "nope.safetensors")
    return ["distributed", "--ingredients", missing, "--out", str(tmp / "o" / "s.safetensors")]


# -- soup your own checkpoints (mmsoup.own) ---------------------------------------------------------
def _own_config(
    tmp: Path, second: dict[str, torch.Tensor] | None = None, command: str = "soup", **keys
) -> list[str]:
    """A soup.yaml over the two-checkpoint pool of an nn.Sequential MLP (test_errors:_mlp3, a
    Python factory: trust_code: true); a key given as None is left out of the file."""
    import yaml

    _pool(tmp, second)
    config = {
        "model": "test_errors:_mlp3",
        "trust_code": True,
        "ingredients": ["pool/*.safetensors"],
        "held_out": "held.pt",
        "out": "soup",
    } | keys
    config = {k: v for k, v in config.items() if v is not None}
    (tmp / "soup.yaml").write_text(yaml.safe_dump(config))
    return [command, "--config", str(tmp / "soup.yaml")]


def _mlp3() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))


@case("own: unknown model", "Unknown model 'resnet-nine'", "timm:NAME")
def _(tmp):
    return _own_config(tmp, model="resnet-nine")


@case(
    "own: missing checkpoint",
    "ingredient 'pool/nope.safetensors' matches no file",
    "check the path",
)
def _(tmp):
    return _own_config(tmp, ingredients=["pool/nope.safetensors"])


@case("own: keys do not match the model", "lacks '2.bias'", "pick the model the checkpoints")
def _(tmp):
    _held(tmp, torch.randn(4, 3))  # a valid held-out set: the model is what is wrong
    return _own_config(tmp, model="test_errors:_mlp")


@case("own: unknown config key", "unknown key 'recipe'", "valid keys: model")
def _(tmp):
    return _own_config(tmp, recipe=["mms"])


@case("own: missing held-out file", "Held-out data", "held.pt does not exist")
def _(tmp):
    return _own_config(tmp)


# A config is data, not code: what would import or run code is refused without the opt-in, and
# every key and value is checked before the model is built ("own config:" rows: create_model too
# must not be called).
@case(
    "own config: a Python factory without the opt-in",
    "model 'subprocess:getoutput' is a Python factory",
    "pass --trust-code (or set trust_code: true",
)
def _(tmp):
    cmd = f"touch {tmp / 'pwned'}"  # the snapshot would see the file if it ran
    return _own_config(
        tmp, model="subprocess:getoutput", model_kwargs={"cmd": cmd}, trust_code=None
    )


@case(
    "own config: trust_remote_code in model_kwargs without the opt-in",
    "model_kwargs sets trust_remote_code",
    "pass --trust-code",
)
def _(tmp):
    kwargs = {"num_classes": 2, "trust_remote_code": True}
    return _own_config(tmp, model="torchvision:resnet18", model_kwargs=kwargs, trust_code=None)


@case(
    "own config: a Hugging Face folder with auto_map (custom code) without the opt-in",
    "hf names custom code (auto_map in its config)",
    "pass --trust-code",
)
def _(tmp):
    folder = tmp / "hf"
    _write(folder / "modeling_evil.py", f"open({str(tmp / 'pwned')!r}, 'w').close()\n")
    auto = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    _write(folder / "config.json", json.dumps({"model_type": "evil", "auto_map": auto}))
    return _own_config(tmp, model="./hf", trust_code=None, command="inspect")


@case(
    "own: a Hugging Face folder whose model_type transformers does not know",
    "has a config.json that transformers",
    "nonexistent_arch",
    "check its model_type or upgrade transformers",
)
def _(tmp):
    _write(tmp / "hf" / "config.json", json.dumps({"model_type": "nonexistent_arch"}))
    held = {"images": torch.randn(4, 3), "labels": torch.tensor([0, 1, 0, 1])}
    torch.save(held, tmp / "held.pt")
    return _own_config(tmp, model="./hf")


@case(
    "own config: a YAML alias bomb",
    "uses the YAML anchor &a (line 1)",
    "aliases and anchors are refused",
    "write the values out",
)
def _(tmp):
    _pool(tmp)
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    _write(tmp / "soup.yaml", "\n".join(lines + ["model: *i", "ingredients: [pool/*.safetensors]"]))
    return ["soup", "--config", str(tmp / "soup.yaml")]


@case("own config: not UTF-8", "is not UTF-8 text (byte 0xff at offset 14)", "save it as UTF-8")
def _(tmp):
    _pool(tmp)
    (tmp / "soup.yaml").write_bytes(b"model: resnet-\xff\xfe\ningredients: [pool/*]\n")
    return ["soup", "--config", str(tmp / "soup.yaml")]


@case("own config: mms budget 0", "mms: budget=0 is out of range", "an integer in 1..100000")
def _(tmp):
    return _own_config(tmp, mms={"budget": 0})


@case("own config: mms budget 'ten'", "mms: budget='ten' has the wrong type (str)", "an integer")
def _(tmp):
    return _own_config(tmp, mms={"budget": "ten"})


@case("own config: mms tau NaN", "mms: tau=nan is out of range", "a number in [0, 1]")
def _(tmp):
    return _own_config(tmp, mms={"tau": float("nan")})


@case("own config: mms tau 1.5", "mms: tau=1.5 is out of range", "a number in [0, 1]")
def _(tmp):
    return _own_config(tmp, mms={"tau": 1.5})


@case("own config: unknown optimizer", "mms: optimizer='Cobila' is not known", "nevergrad")
def _(tmp):
    return _own_config(tmp, mms={"optimizer": "Cobila"})


@case("own config: mms seed -1", "mms: seed=-1 is out of range", "an integer in 0..")
def _(tmp):
    return _own_config(tmp, mms={"seed": -1})


@case(
    "own config: unknown mms key",
    "mms has the unknown key 'budjet'",
    "valid keys: budget, tau, optimizer, seed",
)
def _(tmp):
    return _own_config(tmp, mms={"budjet": 10})


@case("own config: learned epochs 'x'", "learned: epochs='x' has the wrong type", "an integer")
def _(tmp):
    return _own_config(tmp, learned={"epochs": "x"}, recipes=["learned"])


@case(
    "own config: unknown learned key", "learned has the unknown key 'lrate'", "valid keys: epochs"
)
def _(tmp):
    return _own_config(tmp, learned={"lrate": 0.1})


@case("own config: inspect alphas ['x']", "alphas=['x'] is not valid", "numbers in [0, 1]")
def _(tmp):
    return _own_config(tmp, alphas=["x"], command="inspect")


@case("own config: inspect barrier NaN", "barrier=nan is out of range", "a number in [0, 1]")
def _(tmp):
    return _own_config(tmp, barrier=float("nan"), command="inspect")


@case("own config: no ingredients", "has no ingredients", "list two or more checkpoints")
def _(tmp):
    return _own_config(tmp, ingredients=[])


@case("own config: one ingredient", "pool/a.safetensors", "one model is no soup", "two or more")
def _(tmp):
    return _own_config(tmp, ingredients=["pool/a.safetensors"])


@case("own config: shard_size 0", "shard_size=0 is out of range", "a size > 0")
def _(tmp):
    return _own_config(tmp, shard_size=0)


@case("own config: shard_size -1GB", "shard_size='-1GB' is not known", "'500MB'")
def _(tmp):
    return _own_config(tmp, shard_size="-1GB")


@case("own config: batch_size 0", "batch_size=0 is out of range", "an integer in 1..")
def _(tmp):
    return _own_config(tmp, batch_size=0)


@case("own config: partition blocks:0", "partition='blocks:0' is not known", "blocks:N")
def _(tmp):
    return _own_config(tmp, partition="blocks:0")


@case(
    "own config: empty recipes",
    "recipes=[] is not valid",
    "a non-empty list of recipes",
    "Model Stock (model_stock)",
)
def _(tmp):
    return _own_config(tmp, recipes=[])


@case(
    "own config: out inside the ingredients' glob",
    "soup.yaml: out soup lies inside the ingredients' '*/*.safetensors'",
    "a second run would soup the first run's soups",
    "pick an out folder outside it",
)
def _(tmp):
    return _own_config(tmp, ingredients=["*/*.safetensors"], out="soup")


@case(
    "own config: classes and num_classes disagree",
    "lists 2 classes but model_kwargs has num_classes=3",
    "make them agree",
)
def _(tmp):
    kwargs = {"num_classes": 3}
    return _own_config(tmp, model="torchvision:resnet18", model_kwargs=kwargs, classes=["a", "b"])


# Every ingredient's header before the model is built and anything evaluated.
@case(
    "own config: an ingredient with an unknown key",
    "pool/b.safetensors has the unknown key 'head.weight' (0 missing, 1 unexpected) "
    "compared with pool/a.safetensors",
    "the same model",
)
def _(tmp):
    return _own_config(tmp, _state(1, **{"head.weight": torch.ones(1)}))


@case(
    "own config: an ingredient of another shape",
    "pool/b.safetensors: '0.weight' has shape (5, 3) but pool/a.safetensors has (4, 3)",
)
def _(tmp):
    return _own_config(tmp, _state(1, **{"0.weight": torch.ones(5, 3)}))


@case(
    "own config: an ingredient of another dtype",
    "pool/b.safetensors: '0.bias' has dtype torch.float16 but pool/a.safetensors has torch.float32",
    "convert all checkpoints to one dtype",
)
def _(tmp):
    return _own_config(tmp, _state(1, **{"0.bias": torch.ones(4, dtype=torch.float16)}))


@case(
    "own config: the third ingredient lacks a key",
    "pool/c.pt lacks the key '2.weight' (1 missing, 0 unexpected) compared with pool/a.safetensors",
)
def _(tmp):
    argv = _own_config(tmp, ingredients=["pool/*.safetensors", "pool/c.pt"])
    torch.save(_state(2, **{"2.weight": None}), tmp / "pool" / "c.pt")
    return argv


@case(
    "own config: a link to a text file among the ingredients",
    "pool/c.safetensors (a link to",
    "notes.txt) is not a safetensors file",
    "leave it out",
)
def _(tmp):
    _write(tmp / "notes.txt", "not a checkpoint\n")
    argv = _own_config(tmp)
    (tmp / "pool" / "c.safetensors").symlink_to(tmp / "notes.txt")
    return argv


# The held-out set: its classes, its values, its file format.
def _png_folder(root: Path, names: list[str]) -> None:
    from PIL import Image

    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / name / "0.png")


@case(
    "own config: held-out folder lacks a class folder",
    "held has 2 class folders but the model has num_classes=3",
    "a missing folder shifts every later label",
    "classes:",
)
def _(tmp):
    _png_folder(tmp / "held", ["cat", "fox"])
    kwargs = {"num_classes": 3}
    return _own_config(tmp, model="torchvision:resnet18", model_kwargs=kwargs, held_out="held")


@case(
    "own config: held-out folder differs from classes:",
    "held lacks the class folder 'dog' (1 missing, 0 not in classes:)",
    "exactly the config's classes",
)
def _(tmp):
    _png_folder(tmp / "held", ["cat", "fox"])
    return _own_config(
        tmp, model="torchvision:resnet18", held_out="held", classes=["cat", "dog", "fox"]
    )


def _held(tmp: Path, images: torch.Tensor, **more) -> None:
    torch.save({"images": images, "labels": torch.tensor([0, 1, 0, 1]), **more}, tmp / "held.pt")


@case(
    "own config: unknown preprocess key",
    "preprocess has the unknown key 'size'",
    "valid keys: resize, crop, interpolation, mean, std",
)
def _(tmp):
    return _own_config(tmp, preprocess={"size": 32})


@case(
    "own config: preprocess interpolation 'cubic'",
    "preprocess: interpolation='cubic' is not known",
    "one of bilinear, bicubic",
)
def _(tmp):
    return _own_config(tmp, preprocess={"interpolation": "cubic"})


@case("own config: preprocess std 0", "preprocess: std=[0.2, 0, 0.2] is not valid", "> 0")
def _(tmp):
    return _own_config(tmp, preprocess={"std": [0.2, 0, 0.2]})


@case("own config: preprocess mean of 2", "preprocess: mean=[0.5, 0.5] is not valid", "3 numbers")
def _(tmp):
    return _own_config(tmp, preprocess={"mean": [0.5, 0.5]})


@case("own config: preprocess resize 0", "preprocess: resize=0 is out of range", "1..8192")
def _(tmp):
    return _own_config(tmp, preprocess={"resize": 0})


@case("own config: test set missing", "Test data", "nope.pt does not exist", "check the path")
def _(tmp):
    torch.save({"images": torch.randn(4, 3), "labels": torch.tensor([0, 1, 0, 1])}, tmp / "held.pt")
    return _own_config(tmp, test="nope.pt")


@case("own config: test set empty string", "test='' is not known", "a test set")
def _(tmp):
    return _own_config(tmp, test="")


@case("own: test set labels do not match", "Test data", "4 inputs but labels of shape (3,)")
def _(tmp):
    torch.save({"images": torch.randn(4, 3), "labels": torch.tensor([0, 1, 0, 1])}, tmp / "held.pt")
    torch.save({"images": torch.randn(4, 3), "labels": torch.tensor([0, 1, 0])}, tmp / "test.pt")
    return _own_config(tmp, test="test.pt")


@case("own: held-out images all NaN", "held.pt: 4 of 4 inputs hold NaN or Inf", "re-export")
def _(tmp):
    _held(tmp, torch.full((4, 3), float("nan")))
    return _own_config(tmp)


@case("own: held-out images all one value", "every input holds the same value 0.0", "re-export")
def _(tmp):
    _held(tmp, torch.zeros(4, 3))
    return _own_config(tmp)


@case("own: held-out .pt holds a pickle", "held.pt is refused: it holds pickled objects", "re-save")
def _(tmp):
    marker = tmp / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    _held(tmp, torch.randn(4, 3), x=Payload())
    return _own_config(tmp)


@case("own: held-out .npz with an object array", "held.npz is refused: it holds pickled objects")
def _(tmp):
    labels = np.array([0, 1, 0, 1])
    np.savez(tmp / "held.npz", images=np.array([{"a": 1}] * 4, dtype=object), labels=labels)
    return _own_config(tmp, held_out="held.npz")


@case("own: held-out labels do not match the images", "4 inputs but labels of shape (3,)")
def _(tmp):
    torch.save({"images": torch.randn(4, 3), "labels": torch.tensor([0, 1, 0])}, tmp / "held.pt")
    return _own_config(tmp)


# -- held-out data, heads, dataset folders, downloads ----------------------------------------------
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@case("empty held-out set", "held-out set is empty", "pass at least one image")
def _(tmp):
    from mmsoup.evaluate import Evaluator

    return lambda: Evaluator(
        _mlp(), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), device="cpu"
    )


@case(
    "head class count disagrees with the data", "labels go up to 9", "only 2 classes", "use a head"
)
def _(tmp):
    from mmsoup.evaluate import Evaluator

    return lambda: Evaluator(_mlp(), torch.zeros(10, 3), torch.arange(10), device="cpu")


@case(
    "dataset folder missing", "ImageNet is missing", "imagenet/val is not a folder", "data verify"
)
def _(tmp):
    from mmsoup.data.imagenet import load_dataset

    return lambda: load_dataset("ImageNet", root=tmp / "data")


@case(
    "dataset folder in the wrong layout",
    "not ImageNet-1k wnids (cats, dogs)",
    "one folder per wnid",
)
def _(tmp):
    from mmsoup.data.imagenet import load_dataset
    from mmsoup.data.manifest import artifact_path

    folder = artifact_path("imagenet-val", tmp / "data")
    for name in ("cats", "dogs"):
        (folder / name).mkdir(parents=True)
        (folder / name / "1.jpg").write_bytes(b"")
    return lambda: load_dataset("ImageNet", root=tmp / "data")


@case("dataset folder without images", "holds no images for ImageNetV2", "fully unpacked")
def _(tmp):
    from mmsoup.data.imagenet import load_dataset
    from mmsoup.data.manifest import artifact_path

    (artifact_path("imagenetv2-matched-frequency", tmp / "data") / "0").mkdir(parents=True)
    return lambda: load_dataset("ImageNetV2", root=tmp / "data")


@case(
    "manifest checksum mismatch",
    "blob.bin has sha256",
    "the manifest expects",
    "nothing was written",
)
def _(tmp):
    from mmsoup.data import manifest as mf

    source = tmp / "server" / "blob.bin"
    source.parent.mkdir()
    source.write_bytes(b"payload that is not what the manifest promises")
    row = {c: "" for c in mf.COLUMNS} | {"name": "blob", "profile": "paper", "role": "x"}
    row |= {"local_path": "out/blob.bin", "url": source.as_uri(), "sha256": "0" * 64}
    table = pd.DataFrame([row], columns=list(mf.COLUMNS))
    return lambda: mf.fetch(["blob"], tmp, progress=False, manifest=table)


# -- the disk filling up while writing -------------------------------------------------------------
def _full_disk_temp_files(monkeypatch) -> None:
    """Every atomic_path temporary file becomes /dev/full: the kernel's own ENOSPC on write."""
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        os.unlink(name)
        os.symlink("/dev/full", name)
        return fd, name

    monkeypatch.setattr("mmsoup.io.tempfile.mkstemp", mkstemp)


@case(
    "disk full while writing a soup",
    "disk filled up while writing",
    "soup.safetensors",
    "free space",
)
def _(tmp, monkeypatch):
    from mmsoup import checkpoints

    def save_file(tensors, path, metadata=None):  # safetensors' own message for ENOSPC
        Path(path).write_bytes(b"\0" * 64)  # a partial file that must not survive
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    job = _uniform_soup_job(_pool(tmp), tmp)
    monkeypatch.setattr(checkpoints, "save_file", save_file)
    return job


@case(
    "disk full while writing a sidecar", "disk filled up while writing", "soup.json", "free space"
)
def _(tmp, monkeypatch):
    job = _uniform_soup_job(_pool(tmp), tmp)
    _full_disk_temp_files(monkeypatch)  # safetensors renames its own file over it; JSON fails
    return job


@case("disk full while writing a table", "disk filled up while writing", "table1.csv", "free space")
def _(tmp, monkeypatch):
    from mmsoup.table1 import write_table1

    table = pd.DataFrame({"ImageNet": [80.0], "Avg OOD": [50.0]}, index=["Greedy soup"])
    _full_disk_temp_files(monkeypatch)
    return lambda: write_table1(table, tmp / "out")


@case(
    "disk full while writing the MMS state",
    "disk filled up while writing",
    "mms.state",
    "free space",
)
def _(tmp, monkeypatch):
    job = _mms_job(_pool(tmp), tmp, budget=2, state_file=tmp / "out" / "mms.state.json")
    _full_disk_temp_files(monkeypatch)
    return job


# -- the runner --------------------------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# The work a bad input must never start: any of these called is a failed row.
EXPENSIVE = (
    "mmsoup.pretrain.pretrain",
    "mmsoup.pretrain.linear_probe",
    "mmsoup.finetune.run_finetune",
    "mmsoup.sweep.run_finetune",
    "mmsoup.sweep.run_sweep",
    "mmsoup.data.digits.build_all",
    "mmsoup.reproduce.run_notebook",
    "mmsoup.pipeline.finetune_stage",
    "mmsoup.pipeline.soup_stage",
    "mmsoup.pipeline.evaluate_stage",
    "mmsoup.replicates.run_replicate",
    "mmsoup.replicates.run_replicates",
    "mmsoup.distributed.init",
    "mmsoup.own.run_recipes",
    "mmsoup.evaluate.Evaluator.accuracy",
)


def _forbid_work(monkeypatch, targets: tuple[str, ...] = EXPENSIVE) -> None:
    """Make every entry of `targets` (EXPENSIVE) fail the test if it is called."""
    for target in targets:

        def started(*args, _name=target, **kwargs):
            pytest.fail(f"{_name} started before the bad input was refused")

        monkeypatch.setattr(target, started)


@pytest.mark.parametrize("name", list(CASES))
def test_each_bad_input_is_one_sentence_exit_2_and_nothing_written(
    name, tmp_path, capsys, monkeypatch
):
    setup, fragments = CASES[name]
    monkeypatch.chdir(tmp_path)  # default outputs (runs/, figures/) land in the snapshot
    monkeypatch.setenv("MMSOUP_CACHE", str(tmp_path / "cache"))  # an empty cache, in the snapshot
    monkeypatch.setenv("MMSOUP_DATA", str(tmp_path / "data"))
    needs_patch = "monkeypatch" in setup.__code__.co_varnames[: setup.__code__.co_argcount]
    job = setup(tmp_path, monkeypatch) if needs_patch else setup(tmp_path)
    _forbid_work(monkeypatch)  # no pretraining, training or notebook may start
    if name.startswith("own config:"):  # refused from the config and headers alone
        _forbid_work(monkeypatch, ("mmsoup.own.create_model",))
    before = _snapshot(tmp_path)
    if isinstance(job, list):
        argv = job
    else:  # a library call: through a throwaway command, so the CLI contract is checked too
        cli.command("errors-case", "run one row of tests/test_errors.py")(lambda args: job())
        argv = ["errors-case"]
        with pytest.raises(MMSoupError):  # the library raises MMSoupError, nothing else
            job()
        capsys.readouterr()
    try:
        status = cli.main(argv)
    finally:
        if argv == ["errors-case"]:
            del cli.COMMANDS["errors-case"]
    err = capsys.readouterr().err
    assert status == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmsoup: error: "), err
    message = lines[0].removeprefix("mmsoup: error: ")
    assert "Traceback" not in err and message.endswith((".", ")")), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    after = _snapshot(tmp_path)
    assert after == before, f"files changed: {sorted(set(after) ^ set(before))}"


@pytest.mark.parametrize("opt_in", ["--trust-code", "trust_code: true"])
def test_a_python_factory_in_a_config_runs_only_with_the_opt_in(opt_in, tmp_path, capsys):
    """`model: subprocess:getoutput` with a shell command: refused, and the command not run,
    unless the user opts in; then the factory is called (and fails later: not an nn.Module)."""
    marker = tmp_path / "ran"
    cmd = {"cmd": f"touch {marker}"}
    argv = _own_config(tmp_path, model="subprocess:getoutput", model_kwargs=cmd, trust_code=None)
    _held(tmp_path, torch.randn(4, 3))
    assert cli.main(argv) == 2 and not marker.exists()
    assert "pass --trust-code" in capsys.readouterr().err
    if opt_in == "--trust-code":
        argv.append("--trust-code")
    else:
        argv = _own_config(tmp_path, model="subprocess:getoutput", model_kwargs=cmd)
    assert cli.main(argv) == 2 and marker.exists()  # the opt-in let the factory run
    err = capsys.readouterr().err.splitlines()
    assert err == ["mmsoup: error: Model factory 'subprocess:getoutput' returned str, not a "
                   "torch nn.Module; return the model."]  # fmt: skip
    assert not (tmp_path / "soup").exists()


def test_a_hugging_face_folder_with_custom_code_is_imported_only_with_the_opt_in(
    tmp_path, monkeypatch
):
    """auto_map in config.json: refused before transformers is asked; with trust_code=True,
    transformers imports the folder's own module (the marker appears)."""
    pytest.importorskip("transformers")
    from mmsoup.factories import create_model

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder, marker = tmp_path / "hf", tmp_path / "imported"
    code = "from transformers import PretrainedConfig\n"
    code += f"open({str(marker)!r}, 'w').close()\n"
    code += "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    _write(folder / "configuration_evil.py", code)
    auto = {"AutoConfig": "configuration_evil.EvilConfig"}
    _write(folder / "config.json", json.dumps({"model_type": "evil", "auto_map": auto}))
    with pytest.raises(MMSoupError, match="names custom code .*pass --trust-code"):
        create_model(str(folder))
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 (no model class is mapped: any later failure)
        create_model(str(folder), trust_code=True)
    assert marker.exists()


def test_a_yaml_alias_bomb_is_refused_without_expanding_it(tmp_path):
    """The billion laughs: 9 levels of 9 aliases (10^9 strings) refused at its first anchor, in
    a short sentence that never echoes the document."""
    from mmsoup.own import load_config

    lines = ['lol: &a ["' + "x" * 1000 + '"]']
    lines += [f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    _write(tmp_path / "soup.yaml", "\n".join(lines))
    with pytest.raises(MMSoupError, match=r"uses the YAML anchor &a \(line 1\)") as e:
        load_config(tmp_path / "soup.yaml")
    assert len(str(e.value)) < 300 and "xxx" not in str(e.value)
    _write(tmp_path / "alias.yaml", 'model: "timm:resnet18"\nout: *nowhere\n')
    with pytest.raises(MMSoupError, match=r"uses the YAML alias \*nowhere \(line 2\)"):
        load_config(tmp_path / "alias.yaml")


def test_valid_own_configs_load_and_defaults_fill_in(tmp_path):
    """The rules refuse only what is wrong: a config using every key loads as written."""
    from mmsoup.own import load_config

    _pool(tmp_path)
    config = {
        "model": "torchvision:resnet18", "model_kwargs": {"num_classes": 2}, "image_size": 32,
        "ingredients": "pool/*.safetensors", "held_out": "held", "classes": ["cat", "dog"],
        "recipes": ["uniform", "mms", "learned"], "partition": "C8+live",
        "mms": {"budget": 5, "tau": 1, "optimizer": "Cobyla", "seed": 3, "variant": "author",
                "bounds": "unit", "budget_per_component": 2, "accept_ties": True, "refine": False},
        "learned": {"epochs": 1, "lr": 0.1, "batch_size": 8, "temperature": False, "seed": 0},
        "bn_recalibration": "each", "batch_size": 4, "device": "cpu", "out": "out",
        "shard_size": "2GB", "alphas": [0, 0.5, 1], "barrier": 0, "trust_code": False,
    }  # fmt: skip
    _write(tmp_path / "soup.yaml", json.dumps(config))  # JSON is YAML
    cfg = load_config(tmp_path / "soup.yaml")
    assert cfg.mms == config["mms"] and cfg.learned == config["learned"]
    assert len(cfg.ingredients) == 2 and cfg.out == str(tmp_path / "out")
    defaults = load_config(
        {"model": "torchvision:resnet18", "ingredients": str(tmp_path / "pool/*")}
    )
    assert defaults.recipes == ["uniform", "greedy", "mms"] and defaults.trust_code is False
    assert load_config(tmp_path / "soup.yaml", {"shard_size": 500}).shard_size == 500


def test_a_single_ingredient_is_allowed_and_returned_as_the_soup(tmp_path):
    """One checkpoint is a valid (trivial) pool: every recipe returns it unchanged."""
    from mmsoup.soups import greedy_soup, manifold_mixing_soup, uniform_soup

    [path] = _pool(tmp_path)[:1]
    calls = []

    def val_acc(state):
        calls.append(1)
        return 0.5

    expected = _state(0)
    assert all(torch.equal(uniform_soup([path])[k], v) for k, v in expected.items())
    greedy = greedy_soup([path], val_acc, progress=False)
    mms = manifold_mixing_soup([path], val_acc, {"all": list(expected)}, progress=False)
    for res in (greedy, mms):
        assert res.ingredients == [0] and res.n_evals == 1 and res.val_acc == 0.5
        assert all(torch.equal(res.state_dict[k], v) for k, v in expected.items())
    assert len(calls) == 2  # one evaluation each: the ingredient's own accuracy


def _can_mount_tmpfs() -> bool:
    probe = (
        subprocess.run(["unshare", "-rm", "true"], capture_output=True) if _has_unshare() else None
    )
    return probe is not None and probe.returncode == 0


def _has_unshare() -> bool:
    from shutil import which

    return which("unshare") is not None and sys.platform.startswith("linux")


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged mounts (unshare -rm)")
def test_a_really_full_disk_is_one_sentence_and_leaves_nothing(tmp_path):
    """A 64 KiB tmpfs, really full: the kernel's ENOSPC through safetensors' Rust writer."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (
        "import sys, torch; from mmsoup.checkpoints import save_state_dict; "
        "from mmsoup.errors import MMSoupError\n"
        "try:\n    save_state_dict({'w': torch.ones(100_000)}, sys.argv[1])\n"
        "except MMSoupError as e:\n    print(e)\n"
        "import os; print(sorted(os.listdir(os.path.dirname(sys.argv[1]))))"
    )
    inner = 'mount -t tmpfs -o size=64k tmpfs "$1" && exec "$2" -c "$3" "$1/soup.safetensors"'
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", inner, "sh", str(disk), sys.executable, script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    message, listing = proc.stdout.splitlines()
    assert message == (
        f"The disk filled up while writing {disk}/soup.safetensors; free space and run again "
        "(nothing was written)."
    )
    assert listing == "[]"  # nothing half-written


def test_enospc_is_recognised_from_oserror_and_from_foreign_writers():
    from mmsoup.io import _disk_full

    assert _disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert _disk_full(SafetensorError("I/O error: No space left on device (os error 28)"))
    assert not _disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not _disk_full(MMSoupError("The disk filled up while writing x; free space."))


# -- the checks themselves, and progress before long work -------------------------------------------
def test_every_config_field_has_a_rule_and_a_bad_value_row():
    import dataclasses

    from mmsoup.finetune import FIELD_RULES, FinetuneConfig

    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert set(FIELD_RULES) == fields == set(BAD_VALUES)
    for field in fields:  # every field: a wrong type and an out-of-range value in the table
        assert any(name.startswith(f"config {field}=") and "(inline)" in name for name in CASES)
        assert any(name.startswith(f"config {field}=") and "(file)" in name for name in CASES)


def test_valid_configs_still_load_as_before():
    from mmsoup.finetune import FinetuneConfig

    assert FinetuneConfig.from_json({}) == FinetuneConfig()
    config = FinetuneConfig.from_json(
        {"lr": 1, "weight_decay": 0, "label_smoothing": 0.1, "train_images": None}
    )
    assert config.lr == 1 and config.key() == FinetuneConfig(**config.to_json()).key()
    assert FinetuneConfig(lr=np.float64(2e-3), randaug_m=30, augment="randaugment").lr == 2e-3
    with pytest.raises(MMSoupError, match=r"^In x.json \(run 1\), seed=-1 is out of range"):
        FinetuneConfig.from_json({"seed": -1}, "x.json (run 1)")


def test_path_checks_refuse_what_cannot_be_written_and_create_nothing(tmp_path):
    from mmsoup.io import check_readable, check_writable

    deep = tmp_path / "a" / "b" / "c"
    assert check_writable(deep, "--out") == deep and list(tmp_path.iterdir()) == []
    assert check_writable(deep / "m.safetensors", "--out", file=True) and not deep.exists()
    for bad, fragment in (
        ("/proc/forbidden", "no write access to /proc"),
        ("/proc/self/status/x", "is a file"),
        ("/dev/null", "is a file, not a folder"),
    ):
        with pytest.raises(MMSoupError, match=f"^--out {bad} .*{fragment}"):
            check_writable(bad, "--out")
    with pytest.raises(MMSoupError, match="is a folder; pass a file path"):
        check_writable(tmp_path, "--out", file=True)
    with pytest.raises(MMSoupError, match="does not exist"):
        check_readable(tmp_path / "nope.json", "--configs")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_a_read_only_folder_is_refused(tmp_path):
    from mmsoup.io import check_writable

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(MMSoupError, match="cannot be written"):
            check_writable(ro / "figures", "--out")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize(
    "argv",
    [
        ["finetune", "--config", "{}"],
        ["sweep", "--profile", "smoke"],
        ["pretrain", "--profile", "smoke"],
    ],
)
def test_pretraining_started_by_a_command_prints_progress(argv, tmp_path, capsys, monkeypatch):
    """On an empty cache `finetune`, `sweep` and `pretrain` pretrain first: a line per 100 steps."""
    from mmsoup import pretrain

    def prepare(profile, cache_dir=None, threads=None, on_step=None, force=False):
        for step in range(250):  # what pretrain() reports, then stop before any real work
            on_step(step, 250, 1.0)
        raise MMSoupError("stopped after pretraining (test).")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MMSOUP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain, "prepare", prepare)
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "pretrain step 1/250 loss 1.000",
        "pretrain step 101/250 loss 1.000",
        "pretrain step 201/250 loss 1.000",
        "pretrain step 250/250 loss 1.000",
        "mmsoup: error: stopped after pretraining (test).",
    ]


def test_a_bad_config_is_refused_by_the_first_command_in_a_fresh_process(tmp_path):
    """`python -m mmsoup finetune --config '{"epochs": "abc"}'`: one line, exit 2, nothing written."""
    env = {**os.environ, "MMSOUP_CACHE": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(cli.__file__).parents[1]), env.get("PYTHONPATH", "")]
    )
    cmd = [sys.executable, "-m", "mmsoup", "finetune", "--config", '{"epochs": "abc"}']
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "mmsoup: error: In --config, epochs='abc' has the wrong type (str); use an integer >= 1."
    ]
    assert list(tmp_path.iterdir()) == []


def test_the_error_line_starts_a_line_after_a_live_progress_bar(capsys):
    """An error raised mid-loop leaves its bar open (the cursor after it): the CLI closes live
    bars first, so `mmsoup: error:` starts at the beginning of a line, never glued to a bar."""
    from mmsoup.progress import tqdm

    def score(i: int) -> float:
        if i == 3:
            raise MMSoupError("Checkpoint x.safetensors is corrupt; re-save it.")
        return 0.5

    def job(args):  # as run_recipes ranks the ingredients: the comprehension's frame, kept by
        bar = tqdm(range(10), desc="ingredients", mininterval=0)  # the traceback, holds the bar
        return [score(i) for i in bar]

    cli.command("errors-bar", "a bar, then an error")(job)
    try:
        assert cli.main(["errors-bar"]) == 2
    finally:
        del cli.COMMANDS["errors-bar"]
    err = capsys.readouterr().err
    assert "ingredients" in err  # the bar was drawn
    at = err.index("mmsoup: error: ")
    assert at > 0 and err[at - 1] == "\n", repr(err[max(0, at - 40) : at + 20])
    assert err.endswith("mmsoup: error: Checkpoint x.safetensors is corrupt; re-save it.\n")


def test_outputs_respect_the_umask(tmp_path):
    """Atomic writes (mkstemp: 0600) end with the mode open() gives: 0666 & ~umask."""
    import stat

    from mmsoup.io import write_json, write_text

    old = os.umask(0o022)
    try:
        written = [
            write_text(tmp_path / "a.txt", "x"),
            write_json(tmp_path / "b.json", {"a": 1}),
            save_state_dict({"w": torch.ones(2)}, tmp_path / "c.safetensors"),
            tmp_path / "c.json",  # its sidecar
        ]
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in written}
        assert modes == dict.fromkeys(modes, 0o644)
        os.umask(0o077)
        assert stat.S_IMODE(write_text(tmp_path / "d.txt", "x").stat().st_mode) == 0o600
    finally:
        os.umask(old)
