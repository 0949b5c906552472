"""One instruction-set level (mmsoup.isa): the pinned numbers do not depend on what the CPU offers.

One machine cannot be another CPU, but it can pretend to be a smaller one: MKL_ENABLE_INSTRUCTIONS
caps MKL's kernels, and outside settings of torch's capability, oneDNN's ISA and OpenBLAS's core
type are what another machine's libraries would pick. Each case runs in a fresh process (the
libraries read these settings once, when they start): a few training steps of the embedded tiny
ViT (torch, MKL) and a logistic regression (NumPy/SciPy/scikit-learn, OpenBLAS), hashed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmsoup import isa

PROBE = r"""
import hashlib, json
import mmsoup  # first: the pins go into os.environ before torch and numpy start
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from mmsoup.determinism import pinned
from mmsoup.isa import numerics
from mmsoup.models import TINY_ARCH, create_classifier

with pinned(1):
    model = create_classifier(TINY_ARCH, 10, seed=0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 3, 28, 28, generator=gen), torch.randint(10, (32,), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(4):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(300, 96))
    labels = (feats[:, :3] @ rng.normal(size=3) > 0).astype(int)
    coef = LogisticRegression(C=0.3, max_iter=500).fit(feats, labels).coef_
print(json.dumps({
    "torch": hashlib.sha256(weights).hexdigest()[:16],
    "numpy": hashlib.sha256(coef.tobytes()).hexdigest()[:16],
    "numerics": numerics(),
}))
"""

# What other CPUs would make the libraries choose, set from outside.
PRETEND = {
    "this CPU": {},
    "an AVX2-only CPU (MKL capped at AVX2)": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "a pre-AVX2 CPU's choices, exported in the shell": {
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "OPENBLAS_CORETYPE": "Sandybridge",
    },
}


def probe(mode: str, extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in isa.PINS}  # as a fresh shell has it
    env.update(extra, MMSOUP_ISA=mode, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


needs_avx2 = pytest.mark.skipif(
    isa.cpu_flags_level() not in ("avx2", "avx512"), reason="the pinned study needs a CPU with AVX2"
)


@needs_avx2
def test_pinned_numbers_are_the_same_whatever_the_cpu_pretends_to_be():
    runs = {name: probe("avx2", extra) for name, extra in PRETEND.items()}
    first = runs["this CPU"]
    assert first["numerics"]["torch_capability"] == "AVX2"
    assert first["numerics"]["mkl_cbwr"] == "COMPATIBLE,STRICT"
    assert first["numerics"]["openblas"] == ["Haswell"]
    for name, run in runs.items():
        assert (run["torch"], run["numpy"]) == (first["torch"], first["numpy"]), name
        assert run["numerics"] == first["numerics"], name  # the sidecars' record, byte for byte


@needs_avx2
def test_without_the_pins_the_same_pretence_changes_the_numbers():
    """The control: the probe is sensitive to the instruction set, so the test above can fail."""
    native = probe("native", {})
    older = probe("native", PRETEND["a pre-AVX2 CPU's choices, exported in the shell"])
    assert native["numerics"]["isa"] == "native"
    assert native["numerics"]["cpu_flags_level"] == isa.cpu_flags_level()
    assert older["numerics"]["torch_capability"] == "DEFAULT"
    assert native["torch"] != older["torch"]


def test_apply_overrides_outside_settings_unless_native():
    env = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO"}
    assert isa.apply(env) == {**env, **isa.PINS}
    native = {"MMSOUP_ISA": "native", "ATEN_CPU_CAPABILITY": "default"}
    assert isa.apply(dict(native)) == native


def test_this_process_is_pinned_and_check_says_nothing():
    """conftest imports mmsoup first, as every entry point does: the pins are in force here."""
    assert os.environ["MKL_CBWR"] == "COMPATIBLE,STRICT"
    assert isa.numerics()["torch_capability"] == "AVX2"
    assert isa.check() is None
