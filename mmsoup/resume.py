"""Resumable manifold mixing soups: the run's state after each candidate, written atomically.

An MMS run on the paper's scale takes hours (about 59 h for C8 with the MMS author's code). With a state file,
`manifold_mixing_soup` records after every candidate's decision what the next candidate needs:

- `<state>.json`: the position in the best-first order, the mixed list, Ψ's accuracy, the
  per-component weights, the trace, the decisions and the optimizers run, plus a fingerprint of
  the inputs. It is the commit point: replaced atomically, only after Ψ's file is complete.
- `<stem>.psi-<k>.safetensors` (+ sidecar): Ψ after k ingredients were mixed. Ψ changes only on an
  acceptance, so it is rewritten only then; the state names the file and its sha256.

Nothing inside a candidate is saved: each candidate's λ search starts from a fresh memo and a
freshly seeded optimizer, so a run killed mid-candidate redoes that candidate from its start and
reaches the same fused model, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmsoup.checkpoints import (
    Ingredient,
    ingredient_name,
    iter_ingredients,
    library_versions,
    load_state_dict,
    remove_sidecar,
    save_state_dict,
    sidecar_path,
)
from mmsoup.errors import MMSoupError
from mmsoup.io import sha256_file, write_json

STATE_FORMAT = "mmsoup-mms-state/1"
_PROBE = 4  # elements read from each end of every tensor: tells fine-tunes apart, costs nothing


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


def _probe(state: Mapping[str, Tensor]) -> str:
    """A digest of the keys, shapes, dtypes and the first/last elements of every tensor."""
    digest = hashlib.sha256()
    for key, value in state.items():
        flat = value.reshape(-1)
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(_tensor_bytes(flat[:_PROBE]) + _tensor_bytes(flat[-_PROBE:]))
    return digest.hexdigest()[:16]


def _held_out(val_acc: Any) -> dict[str, Any]:
    """What identifies the held-out data of an Evaluator (size, labels, first and last image)."""
    from mmsoup.evaluate import Evaluator

    if not isinstance(val_acc, Evaluator):  # a plain callable: nothing to inspect
        return {"callable": getattr(val_acc, "__qualname__", type(val_acc).__qualname__)}
    digest = hashlib.sha256(_tensor_bytes(val_acc.targets))
    digest.update(_tensor_bytes(val_acc.images[:1]) + _tensor_bytes(val_acc.images[-1:]))
    return {"n": val_acc.n, "num_classes": val_acc.num_classes, "digest": digest.hexdigest()[:16]}


def fingerprint(
    ingredients: Sequence[Ingredient],
    components: Mapping[str, Sequence[str]],
    val_acc: Any,
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything that decides an MMS run's result, as JSON-ready fields compared one by one."""
    pool = []
    for i, state in iter_ingredients(ingredients):
        ingredient = ingredients[i]
        size = (
            os.path.getsize(ingredient)
            if isinstance(ingredient, str | os.PathLike)
            else sum(v.numel() * v.element_size() for v in state.values())
        )
        pool.append(f"{ingredient_name(ingredient, i)}:{size}:{_probe(state)}")
        del state  # one streamed ingredient at a time
    comps = json.dumps({str(c): list(keys) for c, keys in components.items()})
    fp = {
        "ingredients": pool,
        "components": f"{len(components)} components, sha256 {hashlib.sha256(comps.encode()).hexdigest()[:16]}",
        "held_out": _held_out(val_acc),
        "params": dict(params),
        "versions": library_versions(),  # another torch/nevergrad could take other λ steps
    }
    return json.loads(json.dumps(fp))  # as it reads back from the state file (tuples -> lists)


def _first_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """A short description of the first field where two fingerprints differ."""
    for field_name in current:
        old, new = saved.get(field_name), current[field_name]
        if old == new:
            continue
        if isinstance(new, list) and isinstance(old, list):
            if len(old) != len(new):
                return f"{len(old)} ingredients then, {len(new)} now"
            i = next(j for j, (a, b) in enumerate(zip(old, new)) if a != b)
            was, now = old[i].rsplit(":", 2)[0], new[i].rsplit(":", 2)[0]  # name:size:probe
            if was == now:
                return f"ingredient {i} ({now}) has other contents"
            return f"ingredient {i} was {was}, now {now}"
        if isinstance(new, dict) and isinstance(old, dict):
            key = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
            return f"{field_name} {key} was {old.get(key)!r}, now {new.get(key)!r}"
        return f"{field_name} was {old!r}, now {new!r}"
    return "the state format changed"


@dataclass
class MMSState:
    """Where an MMS run stands between two candidates: everything the next candidate needs."""

    done: int  # candidates after the best one already decided (positions 1..done of the order)
    psi: dict[str, Tensor] = field(repr=False)
    acc_psi: float
    mixed: list[int]
    weights: dict[str, list[float]]  # component -> one coefficient per ingredient
    ingredient_val_accs: list[float]
    trace: list[dict[str, Any]]
    decisions: list[dict[str, Any]]
    optimizers: list[dict[str, Any]]
    elapsed_s: float  # wall time spent before this point, over all earlier attempts
    finished: bool = False
    resumed_at: list[int] = field(default_factory=list)  # `done` at each resume


def psi_path(state_file: str | os.PathLike, n_mixed: int) -> Path:
    """The file of Ψ after `n_mixed` ingredients were mixed, beside the state file."""
    state_file = Path(state_file)
    return state_file.with_name(f"{state_file.with_suffix('').name}.psi-{n_mixed}.safetensors")


def _psi_files(state_file: Path) -> list[Path]:
    return sorted(state_file.parent.glob(f"{state_file.with_suffix('').name}.psi-*.safetensors"))


def save(
    state_file: str | os.PathLike, fp: Mapping[str, Any], state: MMSState, psi_changed: bool
) -> Path:
    """Commit `state`: Ψ first (only if it changed), then the JSON state that names it, atomically."""
    state_file = Path(state_file)
    psi_file = psi_path(state_file, len(state.mixed))
    if psi_changed or not psi_file.is_file():
        save_state_dict(state.psi, psi_file, meta={"mms_state": state_file.name})
    record = {f.name: getattr(state, f.name) for f in fields(state) if f.name != "psi"}
    record |= {"format": STATE_FORMAT, "fingerprint": dict(fp)}
    record |= {"psi_file": psi_file.name, "psi_sha256": sha256_file(psi_file)}
    write_json(state_file, record)
    for old in _psi_files(state_file):  # Ψ files of earlier acceptances or of a killed attempt
        if old != psi_file:
            old.unlink(missing_ok=True)
            remove_sidecar(sidecar_path(old))
    return state_file


def load(state_file: str | os.PathLike, fp: Mapping[str, Any]) -> MMSState | None:
    """The saved state if `state_file` exists and was written for the same inputs, else None."""
    state_file = Path(state_file)
    if not state_file.is_file():
        return None
    try:
        record = json.loads(state_file.read_text())
        if record.get("format") != STATE_FORMAT:
            raise ValueError(f"format {record.get('format')!r}")
    except (OSError, ValueError, AttributeError) as e:
        raise MMSoupError(
            f"The MMS state file {state_file} is unreadable ({e}); delete it to start the run over."
        ) from e
    if record["fingerprint"] != fp:
        raise MMSoupError(
            f"The MMS state file {state_file} belongs to a run with other inputs "
            f"({_first_difference(record['fingerprint'], fp)}); delete it to start over, "
            "or pass the same inputs to resume."
        )
    psi_file = state_file.with_name(record["psi_file"])
    if not psi_file.is_file() or sha256_file(psi_file) != record["psi_sha256"]:
        raise MMSoupError(
            f"{psi_file}, the fused model that {state_file} resumes from, is missing or altered; "
            "delete the state file to start the run over."
        )
    saved = {f.name: record[f.name] for f in fields(MMSState) if f.name != "psi"}
    return MMSState(psi=load_state_dict(psi_file), **saved)


def remove(state_file: str | os.PathLike) -> None:
    """Delete a state file and its Ψ files (e.g. once the soup itself is saved)."""
    state_file = Path(state_file)
    for psi_file in _psi_files(state_file):
        psi_file.unlink(missing_ok=True)
        remove_sidecar(sidecar_path(psi_file))
    state_file.unlink(missing_ok=True)
