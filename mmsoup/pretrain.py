"""The embedded default's "pretrained" backbone and its linear probe (LP-FT, Soups App. J.2.1).

Pretraining: the tiny open_clip ViT learns to tell 62 typeset characters (0-9, A-Z, a-z) apart,
drawn on the fly from a glyph bank in fonts disjoint from the renditions test set and jittered per
batch. The head is a scaled cosine classifier (x`temperature` on L2-normalised features and
weights), matching how the features are used later (the classifier of both papers feeds
L2-normalised features to a linear head). The result is cached under `<cache>/backbone/`, keyed by
the config and the glyph bank, and reused when present.

Released backbone: like the 72 CLIP checkpoints of the real study, the embedded backbone is not
re-trained by a reader. The one `make reproduce` uses (pinned instruction set, `mmsoup.isa`; two
threads) is committed in `mmsoup/data/released/` with its sha256 in `data_manifest.csv` (row
`backbone`), and copied into the cache after its checksum is verified. `mmsoup pretrain
--recreate` trains it again from scratch, and a test checks that the result equals the released
file byte for byte.

Linear probe: logistic regression on the frozen, L2-normalised features of the `train` split, C
chosen on `heldout`; its weights initialise the 10-class head -> the LP init (= model_0 of the
sweep, the zero-shot end of WiSE-FT).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmsoup import isa
from mmsoup.checkpoints import load_state_dict, read_sidecar, save_state_dict, sidecar_path
from mmsoup.determinism import pinned
from mmsoup.errors import MMSoupError
from mmsoup.finetune import NUM_CLASSES, digits_cache, lr_factor
from mmsoup.io import cache_root
from mmsoup.models import TINY_ARCH, ImageClassifier, create_classifier

LP_C_GRID = tuple(float(c) for c in np.logspace(-2, 2, 9))  # inverse L2 strengths tried on heldout
RELEASED_DIR = Path(__file__).parent / "data" / "released"  # the committed backbone(s)
RELEASED_ROW = "backbone"  # its row in data_manifest.csv


@dataclass(frozen=True)
class PretrainConfig:
    """Pretraining of the embedded backbone on jittered typeset characters (the cache key)."""

    arch: str = TINY_ARCH
    images: int = 120_000  # glyph renders seen in training (steps = images // batch_size)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    temperature: float = 10.0  # logit scale of the cosine classifier
    seed: int = 0
    eval_images: int = 4096  # fresh renders (another seed) for the reported accuracy

    def key(self, bank_sha: str) -> str:
        """Cache key: hash of the config and of the glyph bank it trains on."""
        blob = json.dumps({**dataclasses.asdict(self), "bank": bank_sha}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _sha(*arrays: np.ndarray) -> str:
    """sha256 over the bytes of arrays (identifies the data a cached result was built from)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def cosine_logits(model: ImageClassifier, images: torch.Tensor, temperature: float) -> torch.Tensor:
    """Scaled cosine classifier: temperature * <normalised features, normalised class weights>."""
    weight = F.normalize(model.classification_head.weight, dim=-1)  # (C, D)
    return temperature * model.features(images) @ weight.T  # (B, C)


def _glyph_batch(bank: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Jittered renders of glyphs `idx` as model input (B, 3, 28, 28)."""
    from mmsoup.data import digits

    return digits.jitter(digits.to_tensor(bank[idx]), gen)


@torch.no_grad()
def fresh_render_accuracy(
    model: ImageClassifier, bank: torch.Tensor, labels: torch.Tensor, config: PretrainConfig
) -> float:
    """Accuracy on `eval_images` fresh jittered renders drawn with a seed unused in training."""
    gen = torch.Generator().manual_seed(config.seed + 10_007)
    model.eval()
    correct = 0
    for start in range(0, config.eval_images, 512):
        idx = torch.randint(len(bank), (min(512, config.eval_images - start),), generator=gen)
        logits = cosine_logits(model, _glyph_batch(bank, idx, gen), config.temperature)
        correct += int((logits.argmax(-1) == labels[idx]).sum())
    return correct / config.eval_images


def pretrain(
    config: PretrainConfig,
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    force: bool = False,
    on_step: Callable[[int, int, float], None] | None = None,
) -> Path:
    """Pretrain the backbone on jittered glyphs, or reuse the cached one; return its checkpoint."""
    from mmsoup.data import digits

    bank_np, labels_np = digits.pretraining_glyphs(cache_dir=digits_cache(cache_dir))
    num_classes = int(labels_np.max()) + 1
    # the thread count and the instruction-set pin are part of the key: either trains other bits
    tag = ("" if threads is None else f"-t{threads}") + ("-avx2" if isa.pinned_mode() else "")
    path = (
        cache_root(cache_dir)
        / "backbone"
        / f"{config.arch}-{config.key(_sha(bank_np, labels_np))}{tag}.safetensors"
    )
    if not force and path.is_file() and "fresh_acc" in read_sidecar(path):
        return path
    if not force and (RELEASED_DIR / path.name).is_file():
        return _copy_released(RELEASED_DIR / path.name, path)

    start = time.perf_counter()
    bank, labels = torch.as_tensor(bank_np), torch.as_tensor(labels_np, dtype=torch.long)
    with pinned(threads):
        model = create_classifier(config.arch, num_classes, seed=config.seed)
        gen = torch.Generator().manual_seed(config.seed)
        steps = config.images // config.batch_size
        if steps < 1:
            raise MMSoupError(
                f"Pretraining on {config.images} images is less than one batch of {config.batch_size}; raise images."
            )
        warmup = max(1, round(config.warmup_frac * steps))
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        model.train()
        for step in range(steps):
            idx = torch.randint(len(bank), (config.batch_size,), generator=gen)
            x = _glyph_batch(bank, idx, gen)
            loss = F.cross_entropy(cosine_logits(model, x, config.temperature), labels[idx])
            for group in opt.param_groups:
                group["lr"] = config.lr * lr_factor(step, steps, warmup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step(step, steps, loss.item())
        train_seconds = time.perf_counter() - start
        fresh_acc = fresh_render_accuracy(model, bank, labels, config)
        used_threads = torch.get_num_threads()
    meta = {
        "kind": "backbone",
        "config": dataclasses.asdict(config),
        "num_classes": num_classes,
        "steps": steps,
        "fresh_acc": fresh_acc,  # top-1 on fresh jittered renders of the pretraining glyphs
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - start, 2),
        "threads": used_threads,
        "glyph_bank_sha256": _sha(bank_np, labels_np),
    }
    save_state_dict(model.state_dict(), path, meta)
    return path


def released_sha256() -> str:
    """The released backbone's sha256, from its row in data_manifest.csv."""
    from mmsoup.data.manifest import read_manifest

    rows = read_manifest()
    row = rows[rows["name"] == RELEASED_ROW]
    if row.empty:
        raise MMSoupError(f"data_manifest.csv has no row {RELEASED_ROW!r}; reinstall mmsoup.")
    return str(row["sha256"].iloc[0])


def _copy_released(released: Path, path: Path) -> Path:
    """Copy the released backbone (and its sidecar) into the cache after checking its sha256."""
    import shutil

    from mmsoup.io import atomic_path, sha256_file

    expected, found = released_sha256(), sha256_file(released)
    if found != expected:
        raise MMSoupError(
            f"The released backbone {released.name} has sha256 {found[:12]}…, not the "
            f"{expected[:12]}… of data_manifest.csv; reinstall mmsoup or run `mmsoup pretrain --recreate`."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # the weights appear only with their sidecar beside them
        shutil.copyfile(released, tmp)
        shutil.copyfile(sidecar_path(released), sidecar_path(path))
    return path


@torch.no_grad()
def features(model: ImageClassifier, images: np.ndarray) -> np.ndarray:
    """Frozen L2-normalised features (N, D) of uint8 digit images (N, 28, 28)."""
    from mmsoup.data import digits

    model.eval()
    x = digits.to_tensor(images)
    return torch.cat([model.features(b) for b in x.split(500)]).numpy().astype(np.float64)


def linear_probe(
    backbone: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    threads: int | None = None,
    force: bool = False,
    heldout_images: int | None = None,
) -> Path:
    """LP init (Soups App. J.2.1, LP-FT): logistic regression on frozen features, C chosen on heldout.

    `heldout_images`: the held-out size of `mmsoup.data.digits.load_split` (None: 1,000); the
    probe is fit on what is left of `train`, and keyed by both splits.
    """
    from sklearn.linear_model import LogisticRegression

    from mmsoup.data import digits

    backbone = Path(backbone)
    held = digits.HELDOUT_IMAGES if heldout_images is None else heldout_images
    splits = {s: digits.load_split(s, held, digits_cache(cache_dir)) for s in digits.SPLITS}
    if out is None:  # keyed by the backbone and the splits it is fit and selected on
        data = _sha(*splits["train"], *splits["heldout"])[:10]
        out = backbone.with_name(f"{backbone.stem}-lp-{data}.safetensors")
    out = Path(out)
    if not force and out.is_file() and "val_acc" in read_sidecar(out):
        return out

    arch = read_sidecar(backbone).get("config", {}).get("arch", TINY_ARCH)
    start = time.perf_counter()
    with pinned(threads):
        model = create_classifier(arch, NUM_CLASSES, seed=0)
        trunk = {k: v for k, v in load_state_dict(backbone).items() if k.startswith("model.")}
        missing, _ = model.load_state_dict(trunk, strict=False)
        if any(k.startswith("model.") for k in missing):
            raise MMSoupError(
                f"{backbone} lacks backbone weights ({missing[0]}); re-run `python -m mmsoup pretrain`."
            )
        (x_train, y_train), (x_held, y_held), (x_test, y_test) = (
            (features(model, images), np.asarray(labels)) for images, labels in splits.values()
        )
        # (pinned: one BLAS thread, so lbfgs takes the same path run after run)
        # Standardised features make lbfgs converge in ~100 iterations instead of thousands; the
        # scaling is folded back into the head below, so the LP init acts on the raw features.
        mean, std = x_train.mean(0), x_train.std(0) + 1e-8
        z_train, z_held = (x_train - mean) / std, (x_held - mean) / std
        tried: dict[float, float] = {}
        best: tuple[float, float, Any] = (-1.0, 0.0, None)
        for c in LP_C_GRID:  # strict >: the smallest C (strongest regularisation) wins ties
            clf = LogisticRegression(C=c, max_iter=2000).fit(z_train, y_train)
            tried[c] = float(clf.score(z_held, y_held))
            if tried[c] > best[0]:
                best = (tried[c], c, clf)
        c, clf = best[1], best[2]
        weight = clf.coef_ / std  # (10, D): W z + b = (W / std) x + (b - (W / std) mean)
        bias = clf.intercept_ - weight @ mean
        head = model.classification_head
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
            # accuracies of the saved float32 head (what model_0 will score), not of sklearn's copy
            val_acc, test_acc = (
                float(
                    (head(torch.as_tensor(x, dtype=torch.float32)).argmax(-1).numpy() == y).mean()
                )
                for x, y in ((x_held, y_held), (x_test, y_test))
            )
    meta = {
        "kind": "lp_init",
        "name": "model_0",
        "backbone": str(backbone),
        "C": c,
        "val_acc_by_C": {str(k): v for k, v in tried.items()},
        "val_acc": val_acc,  # held-out top-1 of the LP init, a fraction
        "test_acc": test_acc,  # of the saved head (float32), on the test split
        "wall_seconds": round(time.perf_counter() - start, 2),
    }
    save_state_dict(model.state_dict(), out, meta)
    return out


def prepare(
    profile: str = "embedded",
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    force: bool = False,
) -> tuple[Path, Path]:
    """The (backbone, LP init) checkpoints of a profile, built if not cached (one command).

    `threads` None: the profile's thread count (see Profile.threads). The backbone comes from the
    released file when there is one for this config (`RELEASED_DIR`); `force` trains it again.
    """
    from mmsoup.profiles import get_profile

    prof = get_profile(profile)
    threads = prof.threads if threads is None else threads
    if prof.pretrain is None:
        raise MMSoupError(
            f"Profile {profile!r} starts from released weights, not from a backbone pretrained here; "
            "use --profile embedded or smoke."
        )
    config = PretrainConfig(arch=prof.arch, **{"seed": prof.pretrain_seed, **prof.pretrain})
    backbone = pretrain(config, cache_dir=cache_dir, threads=threads, on_step=on_step, force=force)
    lp = linear_probe(
        backbone,
        cache_dir=cache_dir,
        threads=threads,
        heldout_images=prof.heldout_images,
        force=force,
    )
    return backbone, lp
