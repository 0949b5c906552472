"""Checkpoints: safe loading, round trips, provenance sidecars, pool validation, streaming."""

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from mmsoup.checkpoints import (
    iter_ingredients,
    load_state_dict,
    read_sidecar,
    save_state_dict,
    validate_pool,
)
from mmsoup.errors import MMSoupError
from mmsoup.models import create_classifier


@pytest.fixture(scope="module")
def released():
    """A state dict in the layout of the released checkpoints (`model.*` + `classification_head.*`)."""
    return create_classifier().state_dict()


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model.visual.proj": torch.randn(4, 3, generator=gen),
        "model.logit_scale": torch.tensor(4.6),  # 0-dim, as in CLIP
        "classification_head.weight": torch.randn(2, 3, generator=gen),
        "classification_head.bias": torch.zeros(2),
    }


def assert_same(a, b, ordered=True):
    assert list(a) == list(b) if ordered else sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds the tensor's data, or None (Linux /proc)."""
    ptr = tensor.untyped_storage().data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            return fields[5] if len(fields) > 5 else None
    return None


def test_safetensors_round_trip_with_provenance_sidecar(tmp_path, released):
    state = dict(released)
    state["extra.half"] = torch.randn(3, 2).half()
    state["extra.bf16"] = torch.randn(5).bfloat16()
    path = save_state_dict(state, tmp_path / "soup.safetensors", {"recipe": "uniform", "n": 3})
    assert_same(load_state_dict(path), state, ordered=False)
    assert_same(load_state_dict(path, mmap=False), state, ordered=False)
    side = read_sidecar(path)
    assert (tmp_path / "soup.json").is_file()
    assert side["recipe"] == "uniform" and side["n"] == 3
    assert side["versions"]["torch"] == torch.__version__ and side["numerics"]["isa"] == "avx2"
    # the wall clock and the machine are not in the sidecar (a re-run writes the same bytes) ...
    assert not {"created", "host", "machine"} & set(side)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "soup.json",
        "soup.safetensors",
        "timings",
    ]
    # ... but beside it, and read_sidecar(timings=True) puts them back
    timed = read_sidecar(path, timings=True)
    assert timed["machine"]["cores"] >= 1 and "created" in timed and timed["recipe"] == "uniform"
    assert (tmp_path / "timings" / "soup.json").is_file()


def test_split_timings_takes_wall_clock_values_at_any_depth():
    from mmsoup.checkpoints import split_timings

    meta = {"val_acc": 0.9, "seconds": 3.2, "info": {"recipe": "x", "wall_time_s": 1.5}, "n": [1]}
    kept, timings = split_timings(meta)
    assert kept == {"val_acc": 0.9, "info": {"recipe": "x"}, "n": [1]}
    assert timings == {"seconds": 3.2, "info": {"wall_time_s": 1.5}}


def test_safetensors_round_trip_keeps_the_key_order(tmp_path, released):
    path = save_state_dict(released, tmp_path / "soup.safetensors")
    assert list(load_state_dict(path)) == list(released)


def test_save_refuses_other_suffixes(tmp_path):
    with pytest.raises(MMSoupError, match=r"soup\.pt must end in \.safetensors"):
        save_state_dict(small_state(), tmp_path / "soup.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("zipfile", [True, False])
def test_pt_round_trip_in_the_released_layout(tmp_path, released, nested, zipfile):
    path = tmp_path / "model_0.pt"
    torch.save(
        {"state_dict": released} if nested else released,
        path,
        _use_new_zipfile_serialization=zipfile,
    )
    assert_same(load_state_dict(path), released)


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Payload()}, path)
    with pytest.raises(MMSoupError, match="evil.pt is refused"):
        load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_plain_pickle_that_would_run_code_is_refused_as_such(tmp_path, protocol):
    """Not torch.save's zip: a protocol 4+ pickle fails on its framing before any import."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": torch.ones(2), "x": Payload()}, protocol=protocol))
    with pytest.raises(MMSoupError, match="evil.pt is refused: it is a pickle that would run code"):
        load_state_dict(path)
    assert not marker.exists()


def test_a_pickle_of_something_else_than_tensors_is_refused(tmp_path):
    path = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(MMSoupError, match="notes.pt does not hold a state dict"):
        load_state_dict(path)


@pytest.mark.parametrize("name", ["cut.safetensors", "cut.pt"])
def test_a_truncated_file_is_reported(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".pt"):
        torch.save(small_state(), path)
    else:
        save_state_dict(small_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MMSoupError, match=f"{name} is truncated or corrupt"):
        load_state_dict(path)


def test_missing_file_and_unknown_suffix_are_reported(tmp_path):
    with pytest.raises(MMSoupError, match="does not exist"):
        load_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(MMSoupError, match="unsupported suffix '.npz'"):
        load_state_dict(tmp_path / "w.npz")


def _pool(tmp_path, second: dict[str, torch.Tensor]) -> list[Path]:
    a = save_state_dict(small_state(0), tmp_path / "a.safetensors")
    b = save_state_dict(second, tmp_path / "b.safetensors")
    return [a, b]


def _changed(**changes) -> dict[str, torch.Tensor]:
    state = small_state(1)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


@pytest.mark.parametrize(
    "second,message",
    [
        (
            _changed(classification_head__bias=None),
            "b.safetensors lacks key 'classification_head.bias'",
        ),
        (_changed(extra__w=torch.ones(1)), "b.safetensors has the extra key 'extra.w'"),
        (
            _changed(model__visual__proj=torch.ones(4, 4)),
            r"b.safetensors: 'model.visual.proj' has shape \(4, 4\)",
        ),
        (
            _changed(classification_head__bias=torch.zeros(2).double()),
            "b.safetensors: 'classification_head.bias' has dtype torch.float64",
        ),
        (
            _changed(classification_head__bias=torch.zeros(2, dtype=torch.int64)),
            "b.safetensors: 'classification_head.bias' has non-floating dtype",
        ),
        (
            _changed(model__logit_scale=torch.tensor(float("nan"))),
            "b.safetensors: 'model.logit_scale' holds NaN or Inf",
        ),
        (
            _changed(model__logit_scale=torch.tensor(float("inf"))),
            "b.safetensors: 'model.logit_scale' holds NaN or Inf",
        ),
    ],
    ids=["missing", "extra", "shape", "dtype", "integer", "nan", "inf"],
)
def test_validate_pool_names_the_file_and_key(tmp_path, second, message):
    with pytest.raises(MMSoupError, match=message):
        validate_pool(_pool(tmp_path, second))


def test_validate_pool_accepts_a_good_pool_and_refuses_an_empty_one(tmp_path):
    spec = validate_pool([*_pool(tmp_path, small_state(1)), small_state(2)])
    assert spec["classification_head.weight"] == (torch.Size([2, 3]), torch.float32)
    with pytest.raises(MMSoupError, match="ingredient list is empty"):
        validate_pool([])


def test_validate_pool_checks_the_first_ingredient_too():
    bad = small_state(0)
    bad["classification_head.bias"] = torch.tensor([1.0, float("nan")])
    with pytest.raises(MMSoupError, match=r"ingredient\[0\]: 'classification_head.bias' holds NaN"):
        validate_pool([bad, small_state(1)])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_iter_ingredients_streams_memory_mapped_tensors(tmp_path, suffix):
    paths = []
    for i in range(3):
        path = tmp_path / f"model_{i}{suffix}"
        if suffix == ".pt":
            torch.save(small_state(i), path)
        else:
            save_state_dict(small_state(i), path)
        paths.append(path)
    stream = iter_ingredients(paths)
    i, first = next(stream)
    assert i == 0 and mapped_file(first["model.visual.proj"]) == str(paths[0])
    assert torch.equal(first["model.visual.proj"], small_state(0)["model.visual.proj"])
    paths[2].unlink()  # not opened yet: streaming reads each file only when its turn comes
    assert next(stream)[0] == 1
    with pytest.raises(MMSoupError, match="model_2.* does not exist"):
        next(stream)


def test_iter_ingredients_passes_in_memory_dicts_through():
    states = [small_state(0), small_state(1)]
    assert [s is states[i] for i, s in iter_ingredients(states)] == [True, True]
