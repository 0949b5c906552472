"""The registry of model families (`mmsoup.factories.FAMILIES`): names, example input sizes of
`blocks:N+live`, class counts read from checkpoints, and a new family added as one row."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import timm
import torch
import torchvision
from torch import nn

from mmsoup import factories
from mmsoup.errors import MMSoupError
from mmsoup.factories import Family, Model, create_model, family, input_size, num_classes
from mmsoup.model_card import _front_matter
from mmsoup.models import TINY_ARCH, create_classifier
from mmsoup.partition import partition


def _timm_resnet():
    return timm.create_model("resnet18", pretrained=False, num_classes=3)


def _timm_small_vit():  # built for 32x32 images: its patch embedding, not pretrained_cfg's 224
    kw = {"num_classes": 4, "img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)


def _torchvision_resnet():
    return torchvision.models.resnet18(num_classes=5)


def _torchvision_by_name():
    return create_model("torchvision:resnet18", num_classes=5).module


@pytest.mark.parametrize(
    "build, size",
    [
        (_timm_resnet, (3, 224, 224)),
        (_timm_small_vit, (3, 32, 32)),
        (_torchvision_resnet, (3, 224, 224)),
        (_torchvision_by_name, (3, 224, 224)),
    ],
)
def test_blocks_live_needs_no_example_input_for_timm_and_torchvision(build, size):
    torch.manual_seed(0)
    model = build()
    assert input_size(model) == size
    found = partition(model, "blocks:4+live")
    given = partition(model, "blocks:4+live", example_input=torch.randn(1, *size))
    assert found == given and len(found) == 4
    assert sum(map(len, found.values())) == sum(
        v.is_floating_point() for v in model.state_dict().values()
    )


def test_an_explicit_example_input_still_wins(monkeypatch):
    import mmsoup.partition

    model = _torchvision_resnet()
    monkeypatch.setattr(mmsoup.partition, "input_size", lambda m: pytest.fail("size looked up"))
    comps = partition(model, "blocks:4+live", example_input=torch.randn(1, 3, 64, 64))
    assert len(comps) == 4
    monkeypatch.undo()

    class Own(nn.Module):  # the user's own module: no family knows its input size
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            return self.layers[2](self.layers[1](self.layers[0](x)))

    own = Own()
    assert input_size(own) is None
    with pytest.raises(MMSoupError, match="pass example_input= to live_components"):
        partition(own, "blocks:3+live")
    assert len(partition(own, "blocks:3+live", example_input=torch.ones(1, 4))) == 3


def test_the_class_count_is_read_where_each_family_keeps_its_head():
    torch.manual_seed(0)
    study = create_classifier(TINY_ARCH, 7).state_dict()
    assert num_classes(study, TINY_ARCH) == 7  # classification_head.weight
    assert num_classes(_timm_resnet().state_dict(), "timm:resnet18") == 3  # fc, per pretrained_cfg
    vit = _timm_small_vit().state_dict()
    assert num_classes(vit, "timm:vit_tiny_patch16_224") == 4  # head
    assert num_classes(_torchvision_resnet().state_dict(), "torchvision:resnet18") == 5  # last
    with pytest.raises(MMSoupError, match="no classification head 'classification_head.weight'"):
        num_classes(vit, TINY_ARCH)


def test_each_name_finds_its_family_and_an_unknown_one_is_one_sentence():
    assert [family(n).source for n in (TINY_ARCH, "timm:resnet18", "torchvision:vgg11")] == [
        "open_clip",
        "timm",
        "torchvision",
    ]
    assert family("hf:org/model").source == "transformers"
    assert family("mypackage.models:build").source == "python"
    with pytest.raises(MMSoupError, match=r"^Unknown model 'my-zoo:x'; use an open_clip name"):
        family("my-zoo:x")
    assert all(f.names in factories.KINDS for f in factories.FAMILIES)


def test_a_new_family_is_one_row(monkeypatch):
    """A row is all a new library needs: its names, its models, their size, head and card."""

    class Mlp(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.stem = nn.Linear(12, width)
            self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
            self.head = nn.Linear(width, 6)

        def forward(self, x):
            x = self.stem(x.flatten(1))
            for block in self.blocks:
                x = block(x).relu()
            return self.head(x)

    def create(name, image_size, trust_code, **kwargs):
        return Model(Mlp(int(name.partition(":")[2].removeprefix("mlp"))).eval(), None, "zoo")

    def check(name):
        if not name.partition(":")[2].startswith("mlp"):
            raise MMSoupError(f"Unknown zoo model {name!r}; e.g. 'zoo:mlp8'.")

    zoo = Family("zoo", "'zoo:NAME'", ("zoo",), create, check, lambda m: (3, 2, 2), library="zoo")
    rows = factories.FAMILIES
    monkeypatch.setattr(factories, "FAMILIES", (*rows[:-1], zoo, rows[-1]))
    factories.check_trust("zoo:mlp8", {}, trust_code=False)  # a prefix, not a Python factory
    with pytest.raises(MMSoupError, match="Unknown zoo model 'zoo:big'"):
        create_model("zoo:big")
    built = create_model("zoo:mlp8")
    assert family("zoo:mlp8") is zoo and built.source == "zoo"
    comps = partition(built.module, "blocks:5+live")  # its input size came from the row
    assert list(comps) == ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]
    assert num_classes(built.module.state_dict(), "zoo:mlp8") == 6  # its last weight
    card = _front_matter(SimpleNamespace(model="zoo:mlp8", values={}), ["mms"])
    assert "library_name: zoo" in card
