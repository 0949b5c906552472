"""The embedded digits benchmark: deterministic, disjoint, balanced, checksummed."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mmsoup.data import digits
from mmsoup.errors import MMSoupError
from mmsoup.io import sha256_file

SETS = (*digits.SPLITS, *digits.SHIFTS)


@pytest.fixture(scope="module")
def built() -> dict[str, Path]:
    """The benchmark in the default cache (built once, shared with the rest of the suite)."""
    return digits.build_all()


def test_build_reproduces_the_manifest_digests(built):
    # the manifest's digests came from an earlier, independent build: equal bytes = deterministic
    expected = digits.expected_sha256()
    assert set(expected) == set(built)
    for name, path in built.items():
        assert sha256_file(path) == expected[name], name


def test_sets_share_no_image(built):
    owner: dict[bytes, str] = {}
    for name in SETS:
        images, _ = digits.load(name)
        for im in images:
            key = hashlib.sha1(im.tobytes()).digest()
            assert owner.setdefault(key, name) == name, f"an image is in {owner[key]} and {name}"


@pytest.mark.parametrize("name", SETS)
def test_each_set_is_balanced_over_ten_classes(built, name):
    images, labels = digits.load(name)
    assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
    assert labels.dtype == np.int64 and len(labels) == len(images)
    counts = np.bincount(labels, minlength=10)
    assert len(counts) == 10 and len(labels) >= 500
    assert counts.min() >= 0.8 * len(labels) / 10


def test_split_sizes_and_digit_format(built):
    assert {s: len(digits.load(s)[1]) for s in digits.SPLITS} == digits.SPLIT_SIZES
    train, _ = digits.load("train")
    assert train.max() == 255 and (train[:, 0, :] == 0).mean() > 0.95  # white digit, black frame


def test_a_corrupt_cache_file_is_rebuilt(built, tmp_path):
    for path in built.values():
        shutil.copy(path, tmp_path / path.name)
    victim = tmp_path / "heldout.npz"
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    images, labels = digits.load("heldout", tmp_path)
    assert sha256_file(victim) == digits.expected_sha256()["heldout"]
    assert np.array_equal(images, digits.load("heldout")[0])


def test_a_build_that_misses_the_manifest_is_one_clear_error(built, tmp_path, monkeypatch):
    # a fresh build whose bytes differ from the manifest (other library versions) must not be used
    sets = {}
    for name, path in built.items():
        with np.load(path) as f:
            sets[name] = (f["images"], f["labels"])
    expected = {**digits.expected_sha256(), "heldout": "0" * 64}
    monkeypatch.setattr(digits, "_build", lambda: sets)  # the real bytes, without the 30 s build
    monkeypatch.setattr(digits, "expected_sha256", lambda: expected)
    with pytest.raises(MMSoupError, match="'heldout'.*library versions"):
        digits.build_all(tmp_path, progress=False)


def test_pretraining_fonts_are_disjoint_from_rendition_fonts():
    pretrain, renditions = digits.font_split()
    assert len(pretrain) >= 10 and len(renditions) >= 10
    assert not set(pretrain) & set(renditions)
    names = {Path(p).name for p in pretrain + renditions}
    assert not names & {
        "cmex10.ttf",
        "cmsy10.ttf",
        "LastResortHE-Regular.ttf",
        "DejaVuSansDisplay.ttf",
    }


def test_glyph_bank_has_62_characters_per_font(built):
    bank, labels = digits.pretraining_glyphs()
    assert set(np.unique(labels)) == set(range(62))
    assert len(bank) == 62 * len(digits.font_split()[0])


def test_to_tensor_normalises_to_three_channels():
    images, _ = digits.load("test")
    x = digits.to_tensor(images[:5])
    assert x.shape == (5, 3, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 2])
    assert x.min().item() == pytest.approx(-digits.MEAN / digits.STD)


def test_jitter_is_seeded_and_keeps_the_background():
    bank, _ = digits.pretraining_glyphs()
    x = digits.to_tensor(bank[:64])
    a = digits.jitter(x, torch.Generator().manual_seed(1))
    b = digits.jitter(x, torch.Generator().manual_seed(1))
    c = digits.jitter(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape
    assert a[:, :, 0, 0].allclose(torch.tensor(-digits.MEAN / digits.STD), atol=1e-4)


def test_unknown_set_is_one_clear_error():
    with pytest.raises(MMSoupError, match="Unknown digits set 'mnist'"):
        digits.load("mnist")


# -- a shift added later: its own random stream, the frozen sets unchanged ------------------------
def _noisy(sets, rng):
    """A stand-in shift: the ID test digits with salt noise drawn from the set's own stream."""
    images, labels = sets["test"]
    salt = rng.random(images.shape) < 0.05
    return np.where(salt, np.uint8(255), images), labels


@pytest.fixture
def with_noisy(monkeypatch):
    """`noisy` registered as an added shift through the seam (`digits.added_shift`), for one test."""
    monkeypatch.setattr(digits, "ADDED", {})
    monkeypatch.setattr(digits, "DESCRIPTIONS", dict(digits.DESCRIPTIONS))
    digits.added_shift("noisy", "ID test digits with 5 % salt noise (a test's stand-in)")(_noisy)


def _frozen_arrays(built):
    return {n: digits._read(built[n]) for n in digits.FROZEN}


def test_an_added_shift_changes_no_other_set(built, tmp_path, with_noisy, monkeypatch):
    # the cached frozen sets are read, not rebuilt: the added set is built from its own stream
    for name in digits.FROZEN:
        shutil.copy(built[name], tmp_path / built[name].name)
    monkeypatch.setattr(digits, "_build", lambda: pytest.fail("the frozen sets were rebuilt"))
    paths = digits.build_all(tmp_path, progress=False)
    expected = digits.expected_sha256()
    assert list(paths) == [*digits.FROZEN, "noisy"]
    for name in digits.FROZEN:
        assert sha256_file(paths[name]) == expected[name], name
    images, labels = digits.load("noisy", tmp_path)
    test_images, test_labels = digits.load("test")
    assert np.array_equal(labels, test_labels) and (images != test_images).mean() > 0.02
    # deterministic: the same bytes as a direct draw from stream("noisy")
    direct = _noisy(_frozen_arrays(built), digits.stream("noisy"))
    assert paths["noisy"].read_bytes() == digits._npz_bytes(*direct)


def test_a_full_build_with_an_added_shift_writes_the_same_bytes(
    built, tmp_path, with_noisy, monkeypatch
):
    # a cold cache takes the full path (_build: the frozen sets, then the added ones)
    monkeypatch.setattr(digits, "_build_frozen", lambda: _frozen_arrays(built))  # no 30 s build
    (tmp_path / "a").mkdir()
    for name in digits.FROZEN:
        shutil.copy(built[name], tmp_path / "a" / built[name].name)
    incremental = digits.build_all(tmp_path / "a", progress=False)
    full = digits.build_all(tmp_path / "b", progress=False)
    for name in (*digits.FROZEN, "noisy"):
        assert sha256_file(full[name]) == sha256_file(incremental[name]), name


def test_each_added_set_draws_from_its_own_stream():
    a = digits.stream("noisy").random(8)
    assert np.array_equal(a, digits.stream("noisy").random(8))  # seeded from (SEED, name)
    assert not np.array_equal(a, digits.stream("blurred").random(8))
    assert not np.array_equal(a, np.random.default_rng(digits.SEED).random(8))  # not the frozen one


def test_an_added_shift_cannot_take_an_existing_name(with_noisy):
    for name in ("clutter", "noisy"):
        with pytest.raises(MMSoupError, match=f"{name!r} exists already"):
            digits.added_shift(name, "again")
