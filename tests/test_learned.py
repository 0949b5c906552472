"""Learned soup (Soups App. I): dot-product gradients, training on held-out loss, the mixture."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mmsoup.evaluate import Evaluator
from mmsoup.learned import learned_soup, mix, soup_gradient
from mmsoup.models import create_classifier
from mmsoup.partition import partition
from mmsoup.soups import REST, mix_from_weights

N_INGREDIENTS = 3


@pytest.fixture(scope="module")
def pool():
    """Three 'fine-tunes' of one tiny ViT (init + noise); held-out labels are ingredient 1's guesses."""
    model = create_classifier()
    init = model.state_dict()
    ingredients = []
    for seed in range(N_INGREDIENTS):
        gen = torch.Generator().manual_seed(seed + 1)
        ingredients.append(
            {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in init.items()}
        )
    images = torch.randn(96, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = torch.func.functional_call(model, ingredients[1], (images,)).argmax(1)
    components = partition(model, "C15+live")  # leaves the text leftovers out (uniform in mix)
    return model, ingredients, images, labels, components


@pytest.fixture(scope="module")
def evaluator(pool):
    model, _, images, labels, _ = pool
    return Evaluator(create_classifier(), images, labels, device="cpu", batch_size=96)


def held_out_loss(model, state, images, labels) -> float:
    with torch.no_grad():
        return F.cross_entropy(torch.func.functional_call(model, state, (images,)), labels).item()


@pytest.mark.parametrize("with_temperature", [True, False])
def test_dot_product_gradient_matches_autograd_through_the_mixture(pool, with_temperature):
    model, ingredients, images, labels, _ = pool
    components = partition(model, "C26+live")
    gen = torch.Generator().manual_seed(3)
    alpha = torch.randn(len(components), N_INGREDIENTS, generator=gen)
    scale = torch.tensor(1.7) if with_temperature else None
    x, y = images[:16], labels[:16]
    loss, grad_alpha, grad_scale = soup_gradient(alpha, scale, ingredients, components, model, x, y)

    # reference: autograd through an explicit functional_call mixture
    a = alpha.clone().requires_grad_(True)
    t = scale.clone().requires_grad_(True) if with_temperature else torch.tensor(1.0)
    w = torch.softmax(a, dim=1)
    owner = {k: j for j, keys in enumerate(components.values()) for k in keys}
    params = {
        k: sum(
            (w[owner[k], i] if k in owner else 1 / N_INGREDIENTS) * ingredients[i][k]
            for i in range(N_INGREDIENTS)
        )
        for k in ingredients[0]
    }
    ref = F.cross_entropy(t * torch.func.functional_call(model, params, (x,)), y)
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    assert grad_alpha.abs().max() > 1e-4  # a real signal, not all zeros
    torch.testing.assert_close(grad_alpha, a.grad, rtol=1e-4, atol=1e-7)
    if with_temperature:
        torch.testing.assert_close(grad_scale, t.grad, rtol=1e-4, atol=1e-7)
    else:
        assert grad_scale is None


def test_learned_soup_lowers_the_held_out_loss(pool, evaluator):
    model, ingredients, images, labels, components = pool
    res = learned_soup(
        ingredients,
        evaluator,
        components,
        epochs=3,
        batch_size=32,
        temperature=False,
        progress=False,
    )
    uniform = mix(ingredients, components, torch.full((len(components), N_INGREDIENTS), 1 / 3))
    assert held_out_loss(model, res.state_dict, images, labels) < held_out_loss(
        model, uniform, images, labels
    )
    epoch_loss = res.info["epoch_loss"]
    assert len(epoch_loss) == 3 and epoch_loss[0] > epoch_loss[1] > epoch_loss[2]
    assert len(res.info["steps"]) == 9  # 3 epochs of 96 held-out images in batches of 32
    # the head learns to lean on the ingredient whose predictions are the labels
    head = res.weights["classification_head.weight"]
    assert max(range(N_INGREDIENTS), key=head.__getitem__) == 1


def test_each_ingredient_is_evaluated_once_and_ranked(pool, evaluator):
    _, ingredients, _, _, components = pool
    res = learned_soup(ingredients, evaluator, components, epochs=0, progress=False)
    accs = [evaluator(ing) for ing in ingredients]
    assert res.ingredient_val_accs == accs and res.ingredients[0] == 1  # its own labels: acc 1
    assert [r["stage"] for r in res.trace] == ["ingredient"] * N_INGREDIENTS + ["final"]
    assert res.n_evals == N_INGREDIENTS + 1 and res.val_acc == evaluator(res.state_dict)
    given = learned_soup(
        ingredients, evaluator, components, epochs=0, progress=False, ingredient_val_accs=accs
    )
    assert given.n_evals == 1 and given.ingredients == res.ingredients


def test_weights_sum_to_one_and_rebuild_the_state_dict(pool, evaluator):
    _, ingredients, _, _, components = pool
    accs = [0.5] * N_INGREDIENTS  # given: no evaluations spent on the ingredients
    res = learned_soup(
        ingredients,
        evaluator,
        components,
        epochs=1,
        batch_size=48,
        progress=False,
        ingredient_val_accs=accs,
    )
    assert res.ingredients == list(range(N_INGREDIENTS))  # best first; ties keep input order
    assert list(res.weights) == [*components, REST]  # + the uniform weights of uncovered keys
    for coefs in res.weights.values():
        assert len(coefs) == N_INGREDIENTS and sum(coefs) == pytest.approx(1.0, abs=1e-6)
    assert len(set(res.weights["classification_head.weight"])) == N_INGREDIENTS  # trained
    owner = {k: name for name, keys in components.items() for k in keys}
    assert set(res.info["uncovered_keys"]) == set(ingredients[0]) - set(owner)
    rebuilt = mix_from_weights(ingredients, components, res.weights)
    for key, value in res.state_dict.items():
        coefs = res.weights[owner.get(key, REST)]
        expected = sum(c * ing[key] for c, ing in zip(coefs, ingredients))
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(value, rebuilt[key], rtol=1e-5, atol=1e-6)
    assert res.info["temperature"] != 1.0  # the logit temperature is learned too


def test_streamed_paths_give_the_same_soup_as_dicts(tmp_path, pool, evaluator):
    _, ingredients, _, _, components = pool
    paths = [tmp_path / f"model_{i}.safetensors" for i in range(N_INGREDIENTS)]
    for path, ing in zip(paths, ingredients):
        save_file(ing, path)  # read back memory-mapped, unaligned: the streaming path
    kwargs = dict(epochs=1, batch_size=48, seed=7, progress=False, ingredient_val_accs=[0.5] * 3)
    from_dicts = learned_soup(ingredients, evaluator, components, **kwargs)
    from_paths = learned_soup(paths, evaluator, components, **kwargs)
    assert from_paths.weights == from_dicts.weights  # bit-identical, not just close
    assert all(torch.equal(from_paths.state_dict[k], v) for k, v in from_dicts.state_dict.items())


def test_a_batchnorm_pool_gives_every_key_of_the_model_with_its_dtype():
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    init = model.state_dict()
    ingredients = []
    for i in range(3):
        gen = torch.Generator().manual_seed(i)
        state = {}
        for k, v in init.items():
            if v.is_floating_point():
                state[k] = v + 0.05 * torch.randn(v.shape, generator=gen)
                state[k] = state[k].abs() if k.endswith("running_var") else state[k]
            else:
                state[k] = v + 10 * (i + 1)  # num_batches_tracked: one count per ingredient
        ingredients.append(state)
    images = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    evaluator = Evaluator(model, images, torch.arange(12) % 3, device="cpu", batch_size=12)
    components = partition(model, "blocks:2")
    res = learned_soup(
        ingredients,
        evaluator,
        components,
        epochs=1,
        progress=False,
        ingredient_val_accs=[0.2, 0.6, 0.4],
    )
    assert list(res.state_dict) == list(init)  # complete, in the model's key order
    assert {k: v.dtype for k, v in res.state_dict.items()} == {k: v.dtype for k, v in init.items()}
    assert res.state_dict["1.num_batches_tracked"].item() == 20  # the best's (1), never averaged
    stacked = torch.stack([s["1.running_mean"] for s in ingredients])
    mixed = res.state_dict["1.running_mean"]  # a float buffer: mixed with its component's weights
    assert (stacked.min(0).values - 1e-6 <= mixed).all() and (
        mixed <= stacked.max(0).values + 1e-6
    ).all()
    model.load_state_dict(res.state_dict)  # strict: loads as it is
