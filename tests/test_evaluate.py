"""The fast evaluator: in-place mixing equals a rebuilt model; projections; clear errors."""

import numpy as np
import pytest
import torch
from torch import nn

from mmsoup.errors import MMSoupError
from mmsoup.evaluate import ClassGroups, ClassSubset, Evaluator, accuracy, correct
from mmsoup.models import create_classifier


def _mlp(seed: int, out: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, out))


def _data(n: int = 40, classes: int = 10):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def _plain_logits(model: nn.Module, state, x) -> torch.Tensor:
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def vit_case():
    """Two tiny open_clip ViT classifiers (the embedded architecture) and 24 28x28 images."""
    base, other = create_classifier(seed=0).state_dict(), create_classifier(seed=1).state_dict()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(24, 3, 28, 28, generator=g)
    labels = _plain_logits(create_classifier(seed=2), base, images).argmax(-1)
    labels[::3] = torch.randint(0, 10, (8,), generator=g)  # a held-out set base does not ace
    comps = {
        "visual": [k for k in base if k.startswith("model.visual.transformer")],
        "head": ["classification_head.weight", "classification_head.bias"],
        "stem": ["model.visual.conv1.weight", "model.visual.class_embedding"],
    }
    return base, other, images, labels, comps


def test_the_live_mix_is_bit_for_bit_mixing_interpolate(vit_case):
    """Evaluator.mix and mixing.interpolate share one kernel: the kept soup is the evaluated model."""
    from mmsoup.mixing import interpolate

    base, other, images, labels, comps = vit_case
    ev = Evaluator(create_classifier(seed=9), images, labels, device="cpu", batch_size=10)
    lambdas = [0.3, 1 / 3, 0.55]
    ev.mix(base, other, comps, lambdas)
    live, rebuilt = ev.model.state_dict(), interpolate(base, other, comps, lambdas)
    assert live.keys() == rebuilt.keys()
    assert all(torch.equal(live[k].view(torch.int32), rebuilt[k].view(torch.int32)) for k in live)
    assert not torch.equal(live["classification_head.weight"], base["classification_head.weight"])


def test_mixed_accuracy_equals_rebuilt_state_dict_and_plain_forward(vit_case):
    base, other, images, labels, comps = vit_case
    ev = Evaluator(create_classifier(seed=9), images, labels, device="cpu", batch_size=10)
    lambdas = [0.3, 0.8, 0.55]
    acc = ev.mixed_accuracy(base, other, comps, lambdas)
    ref = dict(base)  # uncovered keys keep base's values
    for keys, lam in zip(comps.values(), lambdas):
        for k in keys:
            ref[k] = lam * base[k] + (1 - lam) * other[k]
    ref_logits = _plain_logits(create_classifier(seed=3), ref, images)
    assert torch.allclose(ev.logits(), ref_logits, atol=1e-5)
    assert acc == accuracy(ref_logits, labels)
    live = ev.model.state_dict()
    assert all(torch.equal(live[k], base[k]) for k in base if k.startswith("model.ln_final"))


def test_load_then_accuracy_is_a_val_acc_callable(vit_case):
    base, other, images, labels, _ = vit_case
    ev = Evaluator(create_classifier(seed=9), images, labels, device="cpu")
    for state in (base, other):
        assert ev(state) == accuracy(
            _plain_logits(create_classifier(seed=4), state, images), labels
        )
    logits = ev.logits()
    assert (
        logits.shape == (24, 10) and logits.dtype == torch.float32 and logits.device.type == "cpu"
    )


def test_mix_writes_in_place_into_the_one_live_model():
    x, y = _data()
    a, b = _mlp(0).state_dict(), _mlp(1).state_dict()
    ev = Evaluator(_mlp(2), x, y, device="cpu")
    model, ptrs = ev.model, {k: v.data_ptr() for k, v in ev.model.state_dict().items()}
    ev.mix(a, b, {"all": list(a)}, {"all": 0.25})  # lambdas by component name
    assert ev.model is model
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs
    assert torch.allclose(model[0].weight, 0.25 * a["0.weight"] + 0.75 * b["0.weight"])
    ev.mix(a, b, {"all": list(a)}, [1.0])
    assert all(torch.equal(v, a[k]) for k, v in model.state_dict().items())


def test_mix_refuses_inputs_that_alias_the_live_model():
    """Copying `other` in first would overwrite an aliased `base`: Ψ'(λ) = other for every λ."""
    x, y = _data()
    ev = Evaluator(_mlp(2), x, y, device="cpu")
    live, other = ev.model.state_dict(), _mlp(1).state_dict()
    before = {k: v.clone() for k, v in live.items()}
    with pytest.raises(MMSoupError, match="shares memory with the evaluator's live model"):
        ev.mixed_accuracy(live, other, {"all": list(other)}, [0.5])
    assert all(torch.equal(v, before[k]) for k, v in live.items())  # nothing written
    copy = {k: v.clone() for k, v in live.items()}
    ev.mix(copy, other, {"all": list(other)}, [0.5])
    assert torch.allclose(ev.model[0].weight, 0.5 * before["0.weight"] + 0.5 * other["0.weight"])


def test_class_subset_projection_restricts_logits_and_labels_index_the_subset():
    x, _ = _data()
    subset = [7, 2, 5]
    raw = _plain_logits(_mlp(0), _mlp(0).state_dict(), x)
    y = raw[:, subset].argmax(-1)  # labels are positions in the subset
    y[0] = (y[0] + 1) % 3
    ev = Evaluator(_mlp(0), x, y, device="cpu", projection=ClassSubset(subset))
    assert torch.allclose(ev.logits(), raw[:, subset])
    assert ev.accuracy() == pytest.approx((len(x) - 1) / len(x))
    assert torch.allclose(ev.logits(project=False), raw)


def test_class_groups_projection_scores_each_class_by_its_max_logit():
    x, _ = _data()
    groups = [[0, 3], [1], [2, 4, 9]]
    raw = _plain_logits(_mlp(0), _mlp(0).state_dict(), x)
    want = torch.stack([raw[:, g].max(-1).values for g in groups], dim=1)
    ev = Evaluator(_mlp(0), x, want.argmax(-1), device="cpu", projection=ClassGroups(groups))
    assert torch.allclose(ev.logits(), want)
    assert ev.accuracy() == 1.0


def test_correct_and_accuracy_helpers():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    hits = correct(logits, torch.tensor([1, 1, 1]))
    assert hits.dtype == np.bool_ and hits.tolist() == [True, False, True]
    assert accuracy(logits, torch.tensor([1, 1, 1])) == pytest.approx(2 / 3)


def test_head_data_mismatch_and_empty_set_raise_clear_errors():
    x, y = _data()
    with pytest.raises(MMSoupError, match="only 5 classes"):
        Evaluator(_mlp(0, out=5), x, y.clamp(min=7), device="cpu")
    with pytest.raises(MMSoupError, match="only 2 classes"):
        Evaluator(_mlp(0), x, y.clamp(min=3), device="cpu", projection=ClassSubset([0, 1]))
    with pytest.raises(MMSoupError, match="empty"):
        Evaluator(_mlp(0), x[:0], y[:0], device="cpu")
    with pytest.raises(MMSoupError, match="fails on the held-out"):
        Evaluator(_mlp(0), x, y % 3, device="cpu", projection=ClassSubset([0, 1, 42]))


def test_mismatched_state_components_or_lambdas_raise_clear_errors():
    x, y = _data()
    ev = Evaluator(_mlp(0), x, y, device="cpu")
    a = _mlp(1).state_dict()
    with pytest.raises(MMSoupError, match="lacks '2.bias'"):
        ev.load({k: v for k, v in a.items() if k != "2.bias"})
    with pytest.raises(MMSoupError, match="not a floating parameter"):
        ev.mix(a, a, {"c": ["nope"]}, [0.5])
    with pytest.raises(MMSoupError, match="two components"):
        ev.mix(a, a, {"c": ["0.bias"], "d": ["0.bias"]}, [0.5, 0.5])
    with pytest.raises(MMSoupError, match="one per component"):
        ev.mix(a, a, {"c": ["0.bias"]}, [0.5, 0.5])


class _Roomy(nn.Module):
    """An MLP that runs out of 'device memory' on batches larger than `room` (as CUDA would)."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.net, self.room, self.sizes = _mlp(0), room, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.room:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.net(x)


def test_batch_size_is_lowered_until_it_fits_and_results_stay_exact():
    x, y = _data(n=40)
    reference = Evaluator(_Roomy(room=64), x, y, device="cpu", batch_size=40)
    expected_acc, expected_logits = reference.accuracy(), reference.logits()
    ev = Evaluator(_Roomy(room=8), x, y, device="cpu", batch_size=32)
    with pytest.warns(UserWarning) as caught:
        acc = ev.accuracy()
    assert [str(w.message).split(": ")[1] for w in caught] == [
        "evaluating in batches of 16.",
        "evaluating in batches of 8.",
    ]
    assert ev.batch_size == 8 and acc == expected_acc
    assert torch.allclose(ev.logits(), expected_logits, atol=1e-6)  # now fits at once
    a, b = _mlp(1).state_dict(), _mlp(2).state_dict()
    comps = {"all": [f"net.{k}" for k in a]}
    a, b = ({f"net.{k}": v for k, v in sd.items()} for sd in (a, b))
    mixed = Evaluator(_Roomy(room=8), x, y, device="cpu", batch_size=40)
    with pytest.warns(UserWarning, match="batches of") as caught:
        got = mixed.mixed_accuracy(a, b, comps, [0.3])
    assert len(caught) == 3 and mixed.batch_size == 5  # 40 -> 20 -> 10 -> 5
    assert got == reference.mixed_accuracy(a, b, comps, [0.3])
    tiny = Evaluator(_Roomy(room=8), x[:4], y[:4], device="cpu", batch_size=1)
    tiny.model.room = 0  # not even one image fits any more
    with pytest.raises(MMSoupError, match="One image does not fit"):
        tiny.accuracy()
