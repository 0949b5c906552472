"""Read, write, stream and validate state dicts (ingredients of a soup).

Formats: `.safetensors` (memory-mapped) and `.pt`/`.pth`/`.bin` pickles, read only through
`torch.load(..., weights_only=True)` so that a checkpoint can never run code. The 72 released CLIP
checkpoints of Soups (mlfoundations/model-soups) are pickled state dicts of the Soups wrapper (`model.*` +
`classification_head.*`) and load as they are.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import pickle
import platform
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmsoup.errors import MMSoupError
from mmsoup.io import atomic_path, write_json

StateDict = Mapping[str, torch.Tensor]
Ingredient = Union[StateDict, str, os.PathLike]  # noqa: UP007 (a runtime alias)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
KEY_ORDER = "mmsoup_key_order"  # safetensors header entry: the state dict's key order (partitions follow it)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Return the state dict inside a loaded checkpoint object (plain, or under 'state_dict')."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MMSoupError(
            f"{path} does not hold a state dict (a mapping of names to tensors); save model.state_dict() instead."
        )
    return dict(obj)


def _imports_code(path: Path) -> bool:
    """Whether a plain pickle file, read as opcodes and never executed, imports a class or function."""
    import pickletools

    with open(path, "rb") as f:
        if f.read(1) != b"\x80":  # PROTO: protocol 2+ (older pickles reach torch's GLOBAL check)
            return False
        f.seek(0)
        try:  # a whole pickle: a truncated or corrupt file is reported as such
            ops = [op.name for op, _, _ in pickletools.genops(f)]
        except Exception:
            return False
    return bool({"GLOBAL", "STACK_GLOBAL", "INST"} & set(ops))


# a Hugging Face model folder's weights, in the order transformers looks for them
HF_WEIGHTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def _weights_file(folder: Path) -> Path:
    """The weights file (or shard index) of a Hugging Face model folder."""
    for name in HF_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise MMSoupError(
        f"Checkpoint folder {folder} holds none of {', '.join(HF_WEIGHTS)}; pass a weights file or a model folder."
    )


def _load_sharded(index: Path, mmap: bool) -> dict[str, torch.Tensor]:
    """Merge the shards listed by a `*.index.json` (`weight_map`: key -> shard file)."""
    from mmsoup.io import read_json

    meta = read_json(index, "shard index")
    weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise MMSoupError(
            f"Shard index {index} has no 'weight_map'; re-create it (safetensors' sharding format)."
        )
    state: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):  # each shard once, in order
        part = load_state_dict(index.parent / shard, mmap)
        state.update({k: v for k, v in part.items() if weight_map.get(k) == shard})
    missing = [k for k in weight_map if k not in state]
    if missing:
        raise MMSoupError(
            f"Shard index {index} lists {missing[0]!r} ({len(missing)} keys) but its shard lacks it; re-create the shards."
        )
    order = json.loads((meta.get("metadata") or {}).get(KEY_ORDER, "[]"))
    return {k: state[k] for k in order} if sorted(order) == sorted(state) else state


def load_state_dict(path: str | os.PathLike, mmap: bool = True) -> dict[str, torch.Tensor]:
    """Load the state dict of a `.safetensors` or `.pt`/`.pth`/`.bin` file, a sharded checkpoint
    (`*.index.json`) or a Hugging Face model folder (weights only, memory-mapped)."""
    path = Path(path)
    if path.is_dir():
        path = _weights_file(path)
    if path.name.endswith(".index.json") and path.is_file():
        return _load_sharded(path, mmap)
    if not path.is_file():
        raise MMSoupError(f"Checkpoint {path} does not exist; check the path.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            state = load_file(path)
            with safe_open(path, "pt") as f:  # safetensors sorts keys; restore the model's order
                order = json.loads((f.metadata() or {}).get(KEY_ORDER, "[]"))
            if sorted(order) == sorted(state):
                state = {k: state[k] for k in order}
            return state if mmap else {k: v.clone() for k, v in state.items()}
        if suffix in PICKLE_SUFFIXES:
            with warnings.catch_warnings():  # torch's note on a plain pickle's protocol: no news
                warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
                try:
                    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
                except RuntimeError as e:
                    if mmap and "mmap" in str(
                        e
                    ):  # legacy (non-zip) pickles cannot be memory-mapped
                        obj = torch.load(path, map_location="cpu", weights_only=True)
                    else:
                        raise
            return _unwrap(obj, path)
    except (MMSoupError, MemoryError):
        raise
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler met a class or function to import; a plain (non-zip)
        # pickle of protocol 4+ fails on its framing before that, so its opcodes are read instead
        if "GLOBAL" in str(e) or _imports_code(path):
            raise MMSoupError(
                f"{path} is refused: it is a pickle that would run code or build objects other than tensors "
                "(only weights_only=True loading is allowed); re-save it as a plain state dict or .safetensors."
            ) from e
        raise MMSoupError(
            f"{path} is truncated or corrupt (not a PyTorch checkpoint); re-download or re-save it."
        ) from e
    except Exception as e:  # any other failure to parse (KeyError, struct.error, ...) is a bad file
        raise MMSoupError(
            f"{path} is truncated or corrupt ({type(e).__name__}); re-download or re-save it."
        ) from e
    raise MMSoupError(
        f"{path} has an unsupported suffix {suffix!r}; use .safetensors, .pt or .pth."
    )


# safetensors' dtype names (its header) as torch dtypes; any other name is compared as text
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
Spec = dict[str, tuple[tuple[int, ...], Any]]  # key -> (shape, dtype)


def read_spec(path: str | os.PathLike) -> Spec:
    """{key: (shape, dtype)} of a checkpoint without reading its tensors: the safetensors header
    (each shard's, for an index; a Hugging Face folder's weights), or a `.pt` memory-mapped and
    read with weights_only=True (no code runs). A bad file is one sentence naming it."""
    path = Path(path)
    if path.is_dir():
        path = _weights_file(path)
    if path.name.endswith(".index.json") and path.is_file():
        from mmsoup.io import read_json

        meta = read_json(path, "shard index")
        weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise MMSoupError(
                f"Shard index {path} has no 'weight_map'; re-create it (safetensors' sharding format)."
            )
        spec: Spec = {}
        for shard in dict.fromkeys(weight_map.values()):
            part = read_spec(path.parent / str(shard))
            spec.update({k: v for k, v in part.items() if weight_map.get(k) == shard})
        return spec
    if not path.exists():
        if path.is_symlink():
            raise MMSoupError(
                f"Checkpoint {path} is a link to {os.readlink(path)}, which does not exist; fix the link."
            )
        raise MMSoupError(f"Checkpoint {path} does not exist; check the path.")
    if path.suffix.lower() != ".safetensors":
        return {k: (tuple(v.shape), v.dtype) for k, v in load_state_dict(path).items()}
    try:
        with safe_open(path, "pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            return {
                k: (tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype()))
                for k, s in slices.items()
            }
    except Exception as e:  # SafetensorError, OSError: not a safetensors file
        link = f" (a link to {os.path.realpath(path)})" if path.is_symlink() else ""
        raise MMSoupError(
            f"Checkpoint {path}{link} is not a safetensors file or is truncated or corrupt "
            f"({type(e).__name__}); re-download or re-save it, or leave it out."
        ) from e


def provenance(**extra: Any) -> dict[str, Any]:
    """A provenance record: time, host, machine, the numerics settings, versions, plus `extra`.

    `write_sidecar` keeps what decides the bits (`numerics`, `versions`) in the sidecar and moves
    what differs run to run (TIMING_KEYS: time, host, machine, seconds) to a timings file.
    """
    import mmsoup
    from mmsoup.determinism import machine_info
    from mmsoup.isa import numerics

    return {
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "machine": machine_info(),  # where it ran (kept with the timings, not committed)
        "numerics": numerics(),  # what decides the bits: the instruction-set pins (mmsoup.isa)
        "versions": library_versions(),
        "mmsoup": mmsoup.__version__,
        **extra,
    }


# Values that differ from one run of the same computation to the next (wall clock, the machine it
# ran on): never in a sidecar, so that a re-run writes the same bytes; kept in timings/<name>.json.
TIMING_KEYS = frozenset(
    {"created", "host", "machine", "seconds", "train_seconds", "wall_seconds", "wall_time_s"}
)


def split_timings(meta: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta without TIMING_KEYS, the TIMING_KEYS values), at any depth of nested dicts."""
    kept: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    for key, value in meta.items():
        if key in TIMING_KEYS:
            timings[key] = value
        elif isinstance(value, Mapping):
            kept[key], inner = split_timings(value)
            if inner:
                timings[key] = inner
        else:
            kept[key] = value
    return kept, timings


def _merge(meta: dict[str, Any], timings: Mapping[str, Any]) -> dict[str, Any]:
    """`meta` with the values of `timings` put back where split_timings took them from."""
    for key, value in timings.items():
        if isinstance(value, Mapping) and isinstance(meta.get(key), dict):
            _merge(meta[key], value)
        else:
            meta[key] = value
    return meta


def timings_path(sidecar: str | os.PathLike) -> Path:
    """Where a sidecar's timings live: `timings/<name>.json` in the sidecar's folder."""
    sidecar = Path(sidecar)
    return sidecar.parent / "timings" / sidecar.with_suffix(".json").name


def write_sidecar(path: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
    """Write a JSON record without its timings, and the timings beside it (`timings_path`)."""
    kept, timings = split_timings(meta)
    if timings:
        write_json(timings_path(path), timings)
    return write_json(Path(path), kept)


def remove_sidecar(path: str | os.PathLike) -> None:
    """Delete a sidecar and its timings (and the timings folder once it is empty)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    timings = timings_path(path)
    timings.unlink(missing_ok=True)
    if timings.parent.is_dir() and not any(timings.parent.iterdir()):
        timings.parent.rmdir()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide a result (recorded next to every output)."""
    from importlib.metadata import version

    return {
        "python": ".".join(platform.python_version_tuple()[:2]),  # a patch release changes no sum
        "torch": torch.__version__,
        **{name: version(dist) for name, dist in _VERSIONED.items()},
    }


_VERSIONED = {
    "numpy": "numpy",
    "scipy": "scipy",
    "scikit-learn": "scikit-learn",
    "nevergrad": "nevergrad",
    "open_clip": "open_clip_torch",
}


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a checkpoint: same name, `.json` suffix."""
    return Path(path).with_suffix(".json")


def save_state_dict(
    state: StateDict, path: str | os.PathLike, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write `state` as `.safetensors` plus a JSON sidecar with provenance, both atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MMSoupError(
            f"{path} must end in .safetensors; mmsoup writes checkpoints only in that format."
        )
    # clone: safetensors refuses tensors that share memory (tied weights)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={KEY_ORDER: json.dumps(list(tensors))})
        # inside the block: if the sidecar cannot be written, the checkpoint is not renamed in
        # either, so a checkpoint never appears without its sidecar
        write_sidecar(sidecar_path(path), provenance(**(meta or {})))
    return path


def read_sidecar(path: str | os.PathLike, timings: bool = False) -> dict[str, Any]:
    """The JSON sidecar of a checkpoint (or a JSON record), or {} when it has none; `timings`
    puts back its wall-clock values (time, host, machine, seconds) from `timings_path`."""
    side = sidecar_path(path)
    meta = json.loads(side.read_text()) if side.is_file() else {}
    extra = timings_path(side)
    if timings and meta and extra.is_file():
        _merge(meta, json.loads(extra.read_text()))
    return meta


def ingredient_name(ingredient: Ingredient, index: int) -> str:
    """A human name for an ingredient: its file name, or `ingredient[i]` for an in-memory dict."""
    return (
        Path(ingredient).name
        if isinstance(ingredient, str | os.PathLike)
        else f"ingredient[{index}]"
    )


class RenamedCheckpoint(os.PathLike):
    """A checkpoint file whose keys are renamed when it is opened (`rename`: file key -> model
    key; other keys as they are), e.g. a transformers folder saved with the names transformers
    >= 5 converts on load. It is a path everywhere else (its name, its sidecar)."""

    def __init__(self, path: str | os.PathLike, rename: Mapping[str, str]) -> None:
        self.path, self.rename = Path(path), dict(rename)

    def __fspath__(self) -> str:
        return str(self.path)

    __str__ = __fspath__

    def __repr__(self) -> str:
        return f"RenamedCheckpoint({str(self.path)!r}, {len(self.rename)} keys)"

    def open(self) -> dict[str, torch.Tensor]:
        """The state dict under the model's names, in the file's order (memory-mapped)."""
        return {self.rename.get(k, k): v for k, v in load_state_dict(self.path).items()}


def open_ingredient(ingredient: Ingredient) -> StateDict:
    """The state dict of an ingredient: as given if in memory, else loaded lazily (memory-mapped)."""
    if isinstance(ingredient, Mapping):
        return ingredient
    if isinstance(ingredient, RenamedCheckpoint):
        return ingredient.open()
    return load_state_dict(ingredient)


def iter_ingredients(ingredients: Sequence[Ingredient]) -> Iterator[tuple[int, StateDict]]:
    """Yield (index, state dict) one at a time, so at most one streamed ingredient is held."""
    for i, ingredient in enumerate(ingredients):
        yield i, open_ingredient(ingredient)


def buffer_keys(spec: Mapping[str, tuple[torch.Size, torch.dtype]]) -> list[str]:
    """The keys of a pool's spec that are never averaged: non-floating tensors (integer buffers)."""
    return [k for k, (_, dtype) in spec.items() if not dtype.is_floating_point]


def validate_pool(
    ingredients: Sequence[Ingredient], check_finite: bool = True
) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Check that all ingredients share keys, shapes and dtypes and hold finite floating values.

    Non-floating tensors (integer buffers such as BatchNorm's `num_batches_tracked`, `position_ids`)
    are allowed: the recipes never average them, they take them from the best ingredient
    (`buffer_keys`). Returns the reference spec {key: (shape, dtype)}; raises MMSoupError naming
    the file and key.
    """
    if len(ingredients) == 0:
        raise MMSoupError("The ingredient list is empty; pass at least one checkpoint.")
    spec: dict[str, tuple[torch.Size, torch.dtype]] = {}
    first = ingredient_name(ingredients[0], 0)
    for i, state in iter_ingredients(ingredients):
        name = ingredient_name(ingredients[i], i)
        if i == 0:
            spec = {k: (v.shape, v.dtype) for k, v in state.items()}
            if not spec:
                raise MMSoupError(f"{name} holds no tensors; pass a non-empty state dict.")
        else:
            missing, extra = spec.keys() - state.keys(), state.keys() - spec.keys()
            if missing or extra:
                key = sorted(missing or extra)[0]
                what = "lacks" if missing else "has the extra"
                raise MMSoupError(
                    f"{name} {what} key {key!r} ({len(missing)} missing, {len(extra)} extra vs {first}); "
                    "all ingredients must be fine-tuned from the same architecture."
                )
        for key, tensor in state.items():
            shape, dtype = spec[key]
            if tensor.shape != shape:
                raise MMSoupError(
                    f"{name}: {key!r} has shape {tuple(tensor.shape)} but {first} has {tuple(shape)}; the checkpoints are of different architectures."
                )
            if tensor.dtype != dtype:
                kind = "dtype" if tensor.is_floating_point() else "non-floating dtype"
                raise MMSoupError(
                    f"{name}: {key!r} has {kind} {tensor.dtype} but {first} has {dtype}; convert all checkpoints to one dtype."
                )
            if check_finite and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise MMSoupError(
                    f"{name}: {key!r} holds NaN or Inf values; that fine-tuning run diverged, leave it out of the pool."
                )
    return spec
