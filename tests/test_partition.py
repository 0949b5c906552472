"""Component partitions: the paper's groups (MMS §3), coverage, block groups, live detection."""

import pytest
import torch
from torch import nn

from mmsoup.errors import MMSoupError
from mmsoup.models import PAPER_ARCH, create_classifier
from mmsoup.partition import describe, live_components, partition, validate_partition

TEXT = [
    "model.positional_embedding",
    "model.text_projection",
    "model.logit_scale",
    "model.token_embedding.weight",
    "model.ln_final.weight",
    "model.ln_final.bias",
]
VISUAL_C15 = [
    "model.visual.class_embedding",
    "model.visual.positional_embedding",
    "model.visual.proj",
    "model.visual.conv1",
    "model.visual.ln_pre",
    "model.visual.transformer",
    "model.visual.ln_post",
]
HEAD = ["classification_head.weight", "classification_head.bias"]
BLOCKS = [f"model.visual.transformer.resblocks.{i}" for i in range(12)]
VISUAL_C26 = VISUAL_C15[:5] + BLOCKS + VISUAL_C15[6:]
TEXT_C8 = ["model.positional_embedding", "model.text_projection", "model.logit_scale"]
TEXT_C8_TAIL = ["model.token_embedding", "model.ln_final"]
EXPECTED = {  # MMS §3, in checkpoint key order
    "C8": TEXT_C8 + ["model.visual"] + TEXT_C8_TAIL + HEAD,
    "C15": TEXT[:3] + VISUAL_C15 + TEXT[3:] + HEAD,
    "C26": TEXT[:3] + VISUAL_C26 + TEXT[3:] + HEAD,
}
EXPECTED_LIVE = {"C8": ["model.visual"] + HEAD, "C15": VISUAL_C15 + HEAD, "C26": VISUAL_C26 + HEAD}


@pytest.fixture(scope="module")
def vit_b32():
    """A random-init ViT-B/32 classifier in the layout of the 72 released checkpoints."""
    return create_classifier(PAPER_ARCH, 1000)


@pytest.fixture(scope="module")
def tiny():
    return create_classifier()


def _covers_once(components, keys):
    flat = [k for ks in components.values() for k in ks]
    return sorted(flat) == sorted(keys) and len(flat) == len(set(flat))


@pytest.mark.parametrize("scheme", ["C8", "C15", "C26"])
def test_paper_partitions_are_the_released_groups(vit_b32, scheme):
    state = vit_b32.state_dict()
    components = partition(state, scheme)
    assert list(components) == EXPECTED[scheme]
    assert _covers_once(components, list(state))
    assert components["classification_head.weight"] == ["classification_head.weight"]
    if scheme == "C26":
        assert len(components["model.visual.transformer.resblocks.3"]) == 12


@pytest.mark.parametrize("scheme,n_live", [("C8", 3), ("C15", 9), ("C26", 20)])
def test_live_keeps_only_components_that_reach_the_logits(vit_b32, scheme, n_live):
    kept, dropped = live_components(partition(vit_b32, scheme), vit_b32)
    assert len(kept) == n_live and list(kept) == EXPECTED_LIVE[scheme]
    assert dropped == [name for name in EXPECTED[scheme] if name not in kept]
    assert all(name.startswith("model.") and "visual" not in name for name in dropped)


def test_live_leaves_the_model_untouched(tiny):
    frozen = tiny.classification_head.bias
    frozen.requires_grad_(False)
    tiny.train()
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    kept, _ = live_components(partition(tiny, "C15"), tiny)
    assert "classification_head.bias" in kept  # found live although frozen
    assert tiny.training and not frozen.requires_grad
    assert all(p.grad is None for p in tiny.parameters())
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    frozen.requires_grad_(True)


def test_live_drops_a_component_only_if_all_its_keys_are_inert(tiny):
    components = {
        "mixed": ["model.logit_scale", "classification_head.bias"],  # inert + live
        "text": ["model.text_projection", "model.ln_final.weight"],  # inert only
    }
    kept, dropped = live_components(components, tiny)
    assert list(kept) == ["mixed"] and dropped == ["text"]


def test_live_finds_an_unused_parameter_in_any_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    net = Net()
    kept, dropped = live_components(partition(net, "prefix:0"), net, example_input=torch.ones(1, 3))
    assert list(kept) == ["used"] and dropped == ["unused"]
    with pytest.raises(MMSoupError, match="example_input"):
        live_components(partition(net, "prefix:0"), net)


def test_live_modifier_applies_to_any_scheme_and_needs_the_model(tiny):
    with pytest.raises(MMSoupError, match="model="):
        partition(tiny.state_dict(), "C8+live")
    state = tiny.state_dict()
    assert list(partition(state, "C8+live", model=tiny)) == EXPECTED_LIVE["C8"]
    assert "other" not in partition(state, "blocks:3+live", model=tiny)  # text leftovers dropped
    assert len(partition(tiny, "C15+live")) == 9  # a module as first argument is its own model


@pytest.mark.parametrize("scheme", ["C8", "C15", "C26", "prefix:0", "prefix:1:split", "prefix:9"])
def test_every_scheme_covers_each_floating_key_once(tiny, scheme):
    state = dict(tiny.state_dict())
    state["counter"] = torch.tensor(3)  # an integer buffer is not mixed
    components = partition(state, scheme)
    assert _covers_once(components, [k for k in state if k != "counter"])


def test_prefix_depth_counts_dotted_parts_and_short_keys_stand_alone():
    keys = ["a", "b.x.w", "b.x.v", "b.y.w", "c.blocks.0.w", "c.blocks.1.w", "c.norm.w"]
    assert partition(keys, "prefix:0") == {
        "a": ["a"],
        "b": ["b.x.w", "b.x.v", "b.y.w"],
        "c": ["c.blocks.0.w", "c.blocks.1.w", "c.norm.w"],
    }
    assert list(partition(keys, "prefix:1")) == ["a", "b.x", "b.y", "c.blocks", "c.norm"]
    assert list(partition(keys, "prefix:0:split")) == ["a", "b", "c.blocks.0", "c.blocks.1", "c"]


def test_blocks_are_contiguous_in_forward_order_for_any_depth(tiny, vit_b32):
    for model, n_blocks in [(tiny, 4), (vit_b32, 12)]:
        state = model.state_dict()
        units = n_blocks + 3  # stem, blocks, post, head
        forward = [k for k in state if k.startswith("model.visual.")]
        stem = [
            k for k in forward if "resblocks" not in k and "ln_post" not in k and "proj" not in k
        ]
        blocks = [k for k in forward if "resblocks" in k]
        post = [k for k in forward if "ln_post" in k or k.endswith("visual.proj")]
        order = stem + blocks + post + HEAD
        for n in (1, 2, 3, units):
            components = partition(state, f"blocks:{n}")
            assert list(components)[-1] == "other" and components["other"] == [
                k for k in state if k not in order
            ]
            groups = list(components.values())[:-1]
            assert len(groups) == n and [k for g in groups for k in g] == order
        single = partition(state, f"blocks:{units}")
        assert single["stem"] == stem and single["head"] == HEAD
        assert single[f"resblocks.{n_blocks - 1}"][0].startswith(
            f"model.visual.transformer.resblocks.{n_blocks - 1}."
        )


def test_blocks_split_units_as_evenly_as_possible(vit_b32):
    components = partition(vit_b32, "blocks:4")
    assert list(components) == [  # 14 units (stem, 12 blocks, post, head) in 4 groups: 4, 4, 3, 3
        "stem..resblocks.2",
        "resblocks.3..resblocks.6",
        "resblocks.7..resblocks.10",
        "resblocks.11..head",
        "other",
    ]
    assert components["resblocks.11..head"][-2:] == HEAD


def test_blocks_rejects_a_bad_n_or_a_model_without_vision_tower(tiny):
    with pytest.raises(MMSoupError, match="pick N from 1 to 7"):
        partition(tiny, "blocks:8")
    with pytest.raises(MMSoupError, match="pick N from 1 to 7"):
        partition(tiny, "blocks:0")
    with pytest.raises(MMSoupError, match="vision tower"):
        partition(["fc.weight", "fc.bias"], "blocks:1")


@pytest.mark.parametrize("scheme", ["C9", "prefix", "prefix:x", "blocks:2:split", "C8+dead"])
def test_unknown_scheme_lists_the_valid_ones(scheme):
    with pytest.raises(MMSoupError, match="valid schemes: C8, C15, C26, prefix:D"):
        partition(["a.b"], scheme)


def test_validate_partition_names_the_offending_key():
    keys = ["a", "b", "c"]
    validate_partition({"x": ["a", "b"], "y": ["c"]}, keys)
    with pytest.raises(MMSoupError, match="'c' is missing"):
        validate_partition({"x": ["a", "b"]}, keys)
    validate_partition({"x": ["a", "b"]}, keys, complete=False)  # a '+live' partition
    with pytest.raises(MMSoupError, match="'b' is repeated"):
        validate_partition({"x": ["a", "b"], "y": ["b", "c"]}, keys)
    with pytest.raises(MMSoupError, match="'d'"):
        validate_partition({"x": ["a", "b", "c", "d"]}, keys)
    with pytest.raises(MMSoupError, match="'y' is empty"):
        validate_partition({"x": ["a", "b", "c"], "y": []}, keys)


def test_describe_counts_tensors_and_parameters(tiny):
    state = tiny.state_dict()
    table = describe(partition(state, "C15"), state)
    assert list(table.columns) == ["component", "n_tensors", "n_params"]
    assert table["n_params"].sum() == sum(v.numel() for v in state.values())
    row = table.set_index("component").loc["model.visual.ln_pre"]
    assert row["n_tensors"] == 2 and row["n_params"] == 2 * 96


def test_blocks_work_on_a_bare_vision_tower(tiny):
    visual = tiny.model.visual  # keys without the 'model.visual.' prefix, no head
    assert list(partition(visual, "blocks:6")) == [
        "stem",
        *[f"resblocks.{i}" for i in range(4)],
        "post",
    ]
    assert list(partition(visual, "blocks:2+live")) == ["stem..resblocks.1", "resblocks.2..post"]
