"""The one streamed weighted sum (`mixing.weighted_sum`) and the λ search's settings
(`lambda_search.LambdaSearch`), on small real state dicts and checkpoints."""

import pytest
import torch

from mmsoup.checkpoints import save_state_dict
from mmsoup.errors import MMSoupError
from mmsoup.lambda_search import LambdaSearch
from mmsoup.mixing import weighted_sum


def _pool(dtype, n=3):
    g = torch.Generator().manual_seed(0)
    return [
        {"w": torch.randn(4, 3, generator=g).to(dtype), "count": torch.tensor(i)} for i in range(n)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_plain_sum_accumulates_in_float32_and_keeps_the_chosen_buffers(dtype, tmp_path):
    pool = _pool(dtype)
    paths = [save_state_dict(sd, tmp_path / f"model_{i}.safetensors") for i, sd in enumerate(pool)]
    s = weighted_sum(pool, buffers_from=2)
    expected = pool[0]["w"].float() + pool[1]["w"].float() + pool[2]["w"].float()
    assert s.sums["w"].dtype == torch.float32 and torch.equal(s.sums["w"], expected)
    assert s.dtypes == {"w": dtype} and s.kept == {"count": torch.tensor(2)}
    streamed = weighted_sum(paths, buffers_from=2)  # memory-mapped files: the same bytes
    assert torch.equal(streamed.sums["w"], s.sums["w"]) and torch.equal(
        streamed.kept["count"], s.kept["count"]
    )
    running = weighted_sum(pool[:1])
    weighted_sum(pool[1:], into=running)  # a running sum goes on where it stopped
    assert torch.equal(running.sums["w"], s.sums["w"])


def test_the_two_weighted_arithmetics_differ_only_where_the_callers_did():
    pool = [{"w": torch.tensor([-1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}]
    coef = [0.0, 0.5]
    zero = weighted_sum(pool, lambda i, k: coef[i], start="zero").sums["w"]
    scale = weighted_sum(pool, lambda i, k: coef[i], start="scale").sums["w"]
    assert torch.equal(zero, scale) and torch.equal(zero, torch.tensor([1.5, 2.0]))
    # 0·θ_0 alone: "scale" (the learned soup's c_0·θ_0) keeps the sign of -0.0, "zero" skips it
    zero = weighted_sum(pool[:1], lambda i, k: 0.0, start="zero").sums["w"]
    scale = weighted_sum(pool[:1], lambda i, k: 0.0, start="scale").sums["w"]
    assert torch.signbit(scale[0]) and not torch.signbit(zero[0])
    with pytest.raises(MMSoupError, match="start 'copy' without coef"):
        weighted_sum(pool, lambda i, k: 1.0)


def test_the_lambda_search_records_its_settings_in_one_order_and_checks_them():
    search = LambdaSearch.configure("author", "Cobyla", refine=False).sized(3, 0.99, None, None)
    assert search.params == {
        "tau": 0.99,
        "budget": 240,
        "optimizer": "Cobyla",
        "seed": 123456789,
        "variant": "author",
        "bounds": "author",
        "budget_per_component": None,
        "accept_ties": True,
        "refine": False,
    }
    assert list(search.params) == ["tau", "budget", "optimizer", "seed", "variant", "bounds"] + [
        "budget_per_component",
        "accept_ties",
        "refine",
    ]
    per = LambdaSearch.configure("paper", "NGOpt", budget_per_component=7).sized(3, 0.998, 1, 0)
    assert per.budget == 21  # per component wins over a budget
    assert search.order([0.5, 0.7, 0.5]) == [1, 2, 0]  # the author's ties: reverse input order
    assert LambdaSearch.configure("paper", "NGOpt").order([0.5, 0.7, 0.5]) == [1, 0, 2]
    with pytest.raises(MMSoupError, match="Unknown nevergrad optimizer"):
        LambdaSearch.configure("paper", "Cobila")
    with pytest.raises(MMSoupError, match="tau must lie in"):
        LambdaSearch.configure("paper", "NGOpt").sized(3, 1.5, None, None)
