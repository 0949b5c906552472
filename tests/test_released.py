"""The released backbone: the embedded world's "released CLIP weights", committed with its sha256.

A reader's `make reproduce` copies it (after checking its checksum) instead of pretraining for
minutes; `mmsoup pretrain --recreate` trains it again, and the last test checks that what it trains
on this machine is the released file, byte for byte (pinned instruction set, mmsoup.isa).
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest

from mmsoup import isa, pretrain
from mmsoup.checkpoints import load_state_dict, read_sidecar
from mmsoup.data.manifest import read_manifest
from mmsoup.errors import MMSoupError
from mmsoup.io import sha256_file
from mmsoup.profiles import get_profile


def embedded_config() -> pretrain.PretrainConfig:
    prof = get_profile("embedded")
    return pretrain.PretrainConfig(arch=prof.arch, **{"seed": prof.pretrain_seed, **prof.pretrain})


def released_file():
    files = sorted(pretrain.RELEASED_DIR.glob("*.safetensors"))
    assert len(files) == 1, files
    return files[0]


def test_the_released_backbone_is_in_the_manifest_with_its_checksum():
    row = read_manifest().set_index("name").loc[pretrain.RELEASED_ROW]
    path = released_file()
    assert row["role"] == "pretrained" and row["profile"] == "embedded"
    assert row["local_path"].endswith(path.name)
    assert sha256_file(path) == row["sha256"] == pretrain.released_sha256()
    assert int(row["size"]) == path.stat().st_size
    side = read_sidecar(path)
    assert side["kind"] == "backbone" and side["numerics"]["isa"] == "avx2"
    assert side["config"] == embedded_config().__dict__ and side["threads"] == 2
    assert not {"created", "host", "machine", "wall_seconds"} & set(side)


def test_prepare_copies_the_released_backbone_without_pretraining(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("pretrained although a released backbone exists")

    monkeypatch.setattr(pretrain, "create_classifier", no_training, raising=True)
    config = embedded_config()
    path = pretrain.pretrain(config, cache_dir=tmp_path, threads=2)
    assert path.name == released_file().name and path.parent == tmp_path / "backbone"
    assert sha256_file(path) == pretrain.released_sha256()
    assert read_sidecar(path) == read_sidecar(released_file())
    # the name is keyed by the config: another config is not the released one (it would train)
    with pytest.raises(AssertionError, match="pretrained although"):
        pretrain.pretrain(replace(config, seed=1), cache_dir=tmp_path, threads=2)


def test_a_released_file_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "released"
    fake.mkdir()
    src = released_file()
    for f in (src, src.with_suffix(".json")):
        shutil.copyfile(f, fake / f.name)
    with open(fake / src.name, "r+b") as f:  # one flipped byte in the weights
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    monkeypatch.setattr(pretrain, "RELEASED_DIR", fake)
    with pytest.raises(MMSoupError, match="not the .* of data_manifest.csv") as err:
        pretrain.pretrain(embedded_config(), cache_dir=tmp_path / "cache", threads=2)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache" / "backbone" / src.name).exists()  # nothing half-written


@pytest.mark.skipif(
    isa.cpu_flags_level() not in ("avx2", "avx512"), reason="the pinned study needs a CPU with AVX2"
)
def test_recreating_the_backbone_gives_the_released_bytes(tmp_path):
    """`mmsoup pretrain --recreate` on this machine: ~937 pinned training steps (minutes)."""
    path = pretrain.pretrain(embedded_config(), cache_dir=tmp_path, threads=2, force=True)
    assert path.name == released_file().name
    assert sha256_file(path) == pretrain.released_sha256(), "the re-created backbone differs"
    released = load_state_dict(released_file())
    assert all(load_state_dict(path)[k].equal(v) for k, v in released.items())
