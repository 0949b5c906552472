"""Prefix-activation reuse: restarting at the first changed stage is bit for bit a full forward."""

import copy

import pytest
import torch
from torch import nn

from mmsoup.evaluate import ClassSubset, Evaluator
from mmsoup.models import create_classifier
from mmsoup.partition import partition
from mmsoup.soups import interpolate, manifold_mixing_soup

N, BATCH = 40, 16  # 3 batches, the last one partial


pytestmark = pytest.mark.usefixtures("one_thread")  # fast on 2 shared cores (conftest)


@pytest.fixture(scope="module")
def case():
    """Two tiny open_clip ViT classifiers, held-out images, the C26 partition (text leftovers too)."""
    base, other = create_classifier(seed=0).state_dict(), create_classifier(seed=1).state_dict()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 3, 28, 28, generator=g), torch.randint(0, 10, (N,), generator=g)
    comps = partition(base, "C26", model=create_classifier(seed=0))
    return base, other, x, y, comps


def _recording(ev: Evaluator) -> list[torch.Tensor]:
    """Capture the head outputs the evaluator scores (the cache calls ev.project per batch)."""
    seen: list[torch.Tensor] = []
    project = ev.project
    ev.project = lambda logits: seen.append(logits.clone()) or project(logits)
    return seen


def _full_logits(ref: Evaluator) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [ref.forward(x, project=False) for x, _ in ref.batches()]


@pytest.mark.parametrize("cache_mb", [512.0, 1.6, 0.0])  # every block, 2 of 5 blocks, none
def test_random_lambda_walks_equal_fresh_full_evaluations(case, cache_mb):
    base, other, x, y, comps = case
    names = list(comps)
    ev = Evaluator(
        create_classifier(seed=5), x, y, device="cpu", batch_size=BATCH, cache_mb=cache_mb
    )
    ref = Evaluator(create_classifier(seed=6), x, y, device="cpu", batch_size=BATCH, reuse=False)
    g = torch.Generator().manual_seed(1)
    lam = torch.rand(len(names), generator=g)
    assert ev.mixed_accuracy(base, other, comps, lam.tolist()) == ref.mixed_accuracy(
        base, other, comps, lam.tolist()
    )
    assert ev.reuse_stats["stage_runs"] == ev._prefix.n_stages * 3  # the first fills the cache
    seen = _recording(ev)
    # head only, stem only, a middle block, inert text leftovers, proj (checkpoint order != forward
    # order), then random single and multiple coordinates
    moves = [
        "classification_head.weight",
        "model.visual.conv1",
        "model.visual.transformer.resblocks.2",
    ]
    moves += ["model.token_embedding.weight", "model.visual.proj", "model.visual.ln_post"]
    moves += [names[int(i)] for i in torch.randint(0, len(names), (6,), generator=g)] + [None] * 2
    restarts = []
    for move in moves:
        before = ev.reuse_stats.get("stage_runs", 0)
        lam = lam.clone()
        if move is None:
            lam = torch.rand(len(names), generator=g)
        else:
            lam[names.index(move)] = torch.rand((), generator=g)
        seen.clear()
        acc = ev.mixed_accuracy(base, other, comps, lam.tolist())
        assert acc == ref.mixed_accuracy(base, other, comps, lam.tolist())
        full = _full_logits(ref)
        assert len(seen) in (0, len(full))  # nothing recomputed, or every batch's head
        for a, b in zip(seen, full):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # bit for bit
        restarts.append(ev.reuse_stats["stage_runs"] - before)
    stats, per_full = ev.reuse_stats, ev._prefix.n_stages * 3
    kept = set(ev._prefix.residual) & ev._prefix.slots  # residual-stream slots within the budget
    assert len(kept) == {512.0: 5, 1.6: 2, 0.0: 0}[cache_mb]
    assert stats["evaluations"] == len(moves) + 1
    assert restarts[3] == 0  # the text leftovers are never used: nothing to recompute
    assert restarts[1] == per_full  # stem: everything
    if cache_mb > 0:
        assert restarts[0] == 3  # head only: one stage per batch (the features are cached)
    if cache_mb == 512.0:
        assert restarts[2] == 4 * 3  # block 2 (stage 3 of 7): blocks 2, 3, pool, head
    assert stats["stage_runs"] < stats["stage_runs_full"]


def test_cache_is_keyed_by_weight_content_not_by_calls(case):
    """Two evaluators share one live model (as in the pipeline): the other's writes are seen."""
    base, other, x, y, comps = case
    model = create_classifier(seed=7)
    ev = Evaluator(model, x, y, device="cpu", batch_size=BATCH)
    other_set = Evaluator(model, x[:8], y[:8], device="cpu", batch_size=BATCH)
    ref = Evaluator(create_classifier(seed=8), x, y, device="cpu", batch_size=BATCH, reuse=False)
    lam = [0.3] * len(comps)
    first = ev.mixed_accuracy(base, other, comps, lam)
    assert first == ref.mixed_accuracy(base, other, comps, lam)  # a plain full forward
    other_set(other)  # the shared model now holds `other`
    assert ev.accuracy() == ref(other)
    head = {"head": ["classification_head.weight", "classification_head.bias"]}
    ev.load(other)
    runs = ev.reuse_stats["stage_runs"]
    assert ev.mixed_accuracy(base, other, head, [0.3]) == ref.mixed_accuracy(
        base, other, head, [0.3]
    )
    assert ev.reuse_stats["stage_runs"] - runs == ev._prefix.n_stages * 3  # all changed: full
    runs = ev.reuse_stats["stage_runs"]
    assert ev.mixed_accuracy(base, other, comps, lam) == first
    assert ev.reuse_stats["stage_runs"] - runs == ev._prefix.n_stages * 3
    runs = ev.reuse_stats["stage_runs"]
    assert ev.mixed_accuracy(base, other, comps, lam) == first  # same weights again: no forward
    assert ev.reuse_stats["stage_runs"] == runs
    ev.projection = ClassSubset(range(10))  # a new projection: cached hit counts are dropped
    assert ev.mixed_accuracy(base, other, comps, lam) == first


def test_mms_run_is_identical_with_and_without_reuse(case):
    base, other, x, y, comps = case
    live = partition(base, "C26+live", model=create_classifier(seed=0))
    g = torch.Generator().manual_seed(2)
    pool = [
        base,
        other,
        {k: (v + 0.01 * torch.randn(v.shape, generator=g)) for k, v in base.items()},
    ]
    runs = []
    for reuse in (True, False):
        ev = Evaluator(create_classifier(seed=9), x, y, device="cpu", batch_size=BATCH, reuse=reuse)
        res = manifold_mixing_soup(pool, ev, live, tau=0.0, budget=20, progress=False)
        runs.append((res, ev.reuse_stats))
    (a, stats), (b, none) = runs
    assert [r["acc"] for r in a.trace] == [r["acc"] for r in b.trace] and a.weights == b.weights
    assert all(torch.equal(a.state_dict[k], v) for k, v in b.state_dict.items())
    assert none == {} and stats["reused"] > 0  # Cobyla's first steps move one coordinate each


def test_models_other_than_open_clip_vits_take_the_plain_path():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(20, 8), torch.randint(0, 4, (20,))
    ev = Evaluator(mlp, x, y, device="cpu", batch_size=8)
    state = {k: v.clone() for k, v in mlp.state_dict().items()}
    other = {k: torch.randn_like(v) for k, v in state.items()}
    comps = {"first": ["0.weight", "0.bias"], "second": ["2.weight", "2.bias"]}
    acc = ev.mixed_accuracy(state, other, comps, [0.5, 0.25])
    assert ev.reuse_stats == {} and ev._prefix is False
    ref = copy.deepcopy(mlp)  # another instance, loaded with the rebuilt Ψ'(λ), scored by hand
    ref.load_state_dict(interpolate(state, other, comps, [0.5, 0.25]))
    with torch.inference_mode():
        hits = sum(int((ref(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(8), y.split(8)))
    assert acc == hits / len(y)


def test_the_prefix_cache_needs_only_the_public_source_interface():
    """reuse.PrefixCache drives any object with the `reuse.Source` members, not Evaluator privates."""
    import contextlib

    from mmsoup import reuse

    model = create_classifier(seed=0).eval()
    g = torch.Generator().manual_seed(1)
    images, labels = (
        torch.randn(12, 3, 28, 28, generator=g),
        torch.randint(0, 10, (12,), generator=g),
    )

    class Source:  # the members reuse.Source names, and nothing else
        device = torch.device("cpu")
        cache_key = ()

        def __init__(self):
            self.model = model

        def batches(self):
            return iter([(images[:5], labels[:5]), (images[5:], labels[5:])])

        def preprocess(self, x):
            return x

        def project(self, logits):
            return logits

        def autocast(self):
            return contextlib.nullcontext()

        def forward(self, x):
            return model(x)

    cache = reuse.prefix_cache(Source(), budget_bytes=2**24)
    assert cache is not None
    with torch.inference_mode():
        expected = int((model(images).argmax(-1) == labels).sum())
    assert int(cache.hits(Source())) == expected
    head = model.classification_head.weight
    with torch.no_grad():
        head.mul_(-1.0)  # only the last stage changes: a restart from the cached features
    with torch.inference_mode():
        expected = int((model(images).argmax(-1) == labels).sum())
    assert int(cache.hits(Source())) == expected and cache.stats["reused"] == 1
