"""Component partitions: which parameters share one mixing coefficient (MMS §3, Alg. 1).

A partition is an ordered mapping component name -> state-dict keys. Schemes:

- `prefix:D` groups keys by their first D+1 dotted parts, as the author's `groupStateDictKeysByLevel`
  does at level D; `prefix:D:split` also gives each block of an integer-indexed block list
  (`...resblocks.<i>`) its own component. `C8`, `C15`, `C26` are the paper's partitions.
- `blocks:N` cuts a model into N contiguous groups of its units in forward order: an open_clip
  vision tower (stem, blocks, post, head), or any model whose layers sit in integer-indexed lists
  (`layer1.0`, `blocks.3`, `encoder.layer.5`, `model.layers.7`): the stem, the blocks, the head.
- `+live` drops components that cannot change the classifier's output, found by autograd.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from mmsoup.errors import MMSoupError
from mmsoup.factories import input_size

Components = dict[str, list[str]]

ALIASES = {"c8": "prefix:1", "c15": "prefix:2", "c26": "prefix:2:split"}
SCHEMES = "C8, C15, C26, prefix:D, prefix:D:split, blocks:N, each optionally with '+live'"
_POST = ("ln_post", "proj", "attn_pool")  # open_clip VisionTransformer after the blocks
_HEAD = "classification_head"


def _keys(keys_or_state_dict: Iterable[str] | Mapping[str, torch.Tensor] | nn.Module) -> list[str]:
    """Floating keys of a state dict or module (all keys if given bare names), in order."""
    if isinstance(keys_or_state_dict, nn.Module):
        keys_or_state_dict = keys_or_state_dict.state_dict()
    if isinstance(keys_or_state_dict, Mapping):
        return [k for k, v in keys_or_state_dict.items() if v.is_floating_point()]
    return list(keys_or_state_dict)


def validate_partition(
    components: Mapping[str, Sequence[str]], keys: Iterable[str], complete: bool = True
) -> None:
    """Check that `components` use each of `keys` exactly once (MMS §3: a partition of the weights).

    With `complete=False` keys may be left out (a `+live` partition); unknown, repeated or empty
    entries still raise MMSoupError naming the key.
    """
    keys = list(keys)
    known = set(keys)
    if not components:
        raise MMSoupError(
            "The partition has no components; pass at least one, e.g. partition(state, 'C8')."
        )
    owner: dict[str, str] = {}
    for name, members in components.items():
        if isinstance(members, str):
            raise MMSoupError(
                f"Component {name!r} must list keys, not be the string {members!r}; wrap it in a list."
            )
        if len(members) == 0:
            raise MMSoupError(f"Component {name!r} is empty; drop it or give it at least one key.")
        for key in members:
            if key not in known:
                raise MMSoupError(
                    f"Component {name!r} names key {key!r}, which is not a floating parameter of the checkpoint; check its spelling."
                )
            if key in owner:
                raise MMSoupError(
                    f"Key {key!r} is repeated: it is in component {owner[key]!r} and in {name!r}; each key must belong to one component."
                )
            owner[key] = name
    if complete:
        missing = [k for k in keys if k not in owner]
        if missing:
            raise MMSoupError(
                f"Key {missing[0]!r} is missing from the partition ({len(missing)} keys in no component); add it to a component."
            )


def _prefix(keys: Sequence[str], depth: int, split: bool) -> Components:
    """Group keys by their first depth+1 dotted parts; with `split`, one group per indexed block."""
    groups: Components = {}
    for key in keys:
        parts = key.split(".")
        cut = depth + 1
        if split:  # the first integer part past the prefix indexes a block list: cut after it
            cut = next((i + 1 for i in range(cut, len(parts)) if parts[i].isdigit()), cut)
        groups.setdefault(".".join(parts[:cut]), []).append(key)
    return groups


def _vision_units(keys: Sequence[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The open_clip vision tower's units in forward order (stem, blocks, post, head), and the rest."""
    towers = [k[: -len("class_embedding")] for k in keys if k.split(".")[-1] == "class_embedding"]
    towers = [t for t in towers if any(k.startswith(t + "transformer.resblocks.") for k in keys)]
    if not towers:
        return _indexed_units(keys), []
    tower = towers[0]  # e.g. "model.visual."
    block = re.compile(re.escape(tower) + r"transformer\.resblocks\.(\d+)\.")
    stem, post, head, rest = [], [], [], []
    blocks: dict[int, list[str]] = {}
    for key in keys:
        if key.split(".")[0] == _HEAD:
            head.append(key)
        elif key.startswith(tower):  # tower may be "" for a bare open_clip VisionTransformer
            match = block.match(key)
            if match:
                blocks.setdefault(int(match.group(1)), []).append(key)
            elif key[len(tower) :].split(".")[0] in _POST:
                post.append(key)
            else:
                stem.append(key)
        else:
            rest.append(key)
    units = [("stem", stem)] + [(f"resblocks.{i}", blocks[i]) for i in sorted(blocks)]
    units += [("post", post), ("head", head)]
    return [(n, ks) for n, ks in units if ks], rest


def _indexed_units(keys: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Any model's units in forward (state-dict) order: stem, each indexed block, head.

    A block is the prefix up to a key's first integer part (`layer1.0`, `encoder.layer.5`); keys
    before the first block form the stem, keys after the last the head, and a key between blocks
    that is in none (e.g. a norm between stages) joins the unit before it, so units stay contiguous.
    """
    block_of = []
    for key in keys:
        parts = key.split(".")
        cut = next((i + 1 for i, p in enumerate(parts[:-1]) if p.isdigit()), None)
        block_of.append(".".join(parts[:cut]) if cut else None)
    indexed = [i for i, b in enumerate(block_of) if b is not None]
    if not indexed:
        raise MMSoupError(
            "Scheme 'blocks:N' needs an open_clip vision tower or layers in integer-indexed lists "
            "(keys such as 'layer1.0.*', 'blocks.3.*', 'encoder.layer.5.*'); use a 'prefix:D' scheme."
        )
    units: list[tuple[str, list[str]]] = [("stem", [])]
    for i, key in enumerate(keys):
        if i > indexed[-1]:
            if units[-1][0] != "head":
                units.append(("head", []))
        elif block_of[i] is not None and block_of[i] != units[-1][0]:
            if any(name == block_of[i] for name, _ in units):
                raise MMSoupError(
                    f"Block {block_of[i]!r} is split by other keys in the state dict (at {key!r}); "
                    "blocks:N needs each block's keys together, use a 'prefix:D' scheme."
                )
            units.append((block_of[i], []))
        units[-1][1].append(key)
    return [(n, ks) for n, ks in units if ks]


def _blocks(keys: Sequence[str], n_groups: int) -> Components:
    """N contiguous groups of vision-tower units, as even as possible; text leftovers -> 'other'."""
    units, rest = _vision_units(keys)
    if not 1 <= n_groups <= len(units):
        raise MMSoupError(
            f"Scheme 'blocks:{n_groups}' asks for {n_groups} groups but this model has "
            f"{len(units)} units ({units[0][0]}, ..., {units[-1][0]}); pick N from 1 to {len(units)}."
        )
    size, extra = divmod(len(units), n_groups)  # the first `extra` groups take one unit more
    groups: Components = {}
    start = 0
    for g in range(n_groups):
        chunk = units[start : start + size + (g < extra)]
        start += len(chunk)
        name = chunk[0][0] if len(chunk) == 1 else f"{chunk[0][0]}..{chunk[-1][0]}"
        groups[name] = [k for _, ks in chunk for k in ks]
    if rest:
        groups["other"] = list(rest)
    return groups


def _example_input(model: nn.Module) -> torch.Tensor:
    """A random image batch (1, C, H, W) of the size the model expects: an open_clip tower's
    `image_size`, a timm model's pretrained_cfg, torchvision's 224 (`factories.input_size`)."""
    size = input_size(model)
    if size is None:
        raise MMSoupError(
            f"Cannot tell the input size of {type(model).__name__} (no 'image_size' attribute, "
            "timm pretrained_cfg or torchvision default); pass example_input= to live_components."
        )
    channels, h, w = size
    ref = next(model.parameters())
    gen = torch.Generator().manual_seed(0)  # leaves the global RNG alone
    x = torch.randn(1, channels, h, w, generator=gen)
    return x.to(device=ref.device, dtype=ref.dtype)


def live_components(
    components: Mapping[str, Sequence[str]],
    model: nn.Module,
    example_input: torch.Tensor | None = None,
) -> tuple[Components, list[str]]:
    """Split components into those that can change the output and the dropped inert ones (MMS §4).

    One forward on a random input and a backward of the output sum: a tensor that gets no gradient
    (grad None) is not in the autograd graph. A component is dropped only if all its keys are inert.
    Returns (kept components, dropped names). The model is not modified.
    """
    state = model.state_dict(keep_vars=True)
    for name, members in components.items():
        for key in members:
            if key not in state:
                raise MMSoupError(
                    f"Component {name!r} names key {key!r}, which {type(model).__name__} does not have; pass the model the checkpoints belong to."
                )
    x = _example_input(model) if example_input is None else example_input
    x = x.to(next(model.parameters()).device)
    # BatchNorm running statistics cannot carry a gradient; they are live when their layer is
    stats = {
        f"{name}.{b}" if name else b
        for name, mod in model.named_modules()
        if isinstance(mod, nn.modules.batchnorm._NormBase)
        for b in ("running_mean", "running_var")
    }
    # Fresh leaves replace the module's tensors, so nothing of the model (grads, flags) changes.
    leaves = {
        k: v.detach().requires_grad_(k not in stats)
        for k, v in state.items()
        if v.is_floating_point()
    }
    was_training = model.training
    model.eval()  # no running-statistics updates, no dropout
    try:
        with torch.enable_grad():
            out = torch.func.functional_call(model, leaves, (x,))
            outs = out.values() if isinstance(out, Mapping) else out
            outs = [out] if isinstance(out, torch.Tensor) else list(outs)
            total = sum(
                o.float().sum() for o in outs if torch.is_tensor(o) and o.is_floating_point()
            )
            wanted = [k for k in leaves if k not in stats]
            grads = torch.autograd.grad(total, [leaves[k] for k in wanted], allow_unused=True)
    finally:
        model.train(was_training)
    live = {k for k, g in zip(wanted, grads) if g is not None}
    for key in stats & leaves.keys():  # live with its layer's affine weights (or always, if none)
        layer = key.rsplit(".", 1)[0] + "."
        siblings = [k for k in wanted if k.startswith(layer) and k.count(".") == key.count(".")]
        if not siblings or any(k in live for k in siblings):
            live.add(key)
    kept = {n: list(ks) for n, ks in components.items() if any(k in live for k in ks)}
    dropped = [n for n in components if n not in kept]
    return kept, dropped


def partition(
    keys_or_state_dict: Iterable[str] | Mapping[str, torch.Tensor] | nn.Module,
    scheme: str,
    model: nn.Module | None = None,
    example_input: torch.Tensor | None = None,
) -> Components:
    """Partition the floating parameters into components by `scheme` (MMS §3, Alg. 1).

    Schemes: C8, C15, C26, prefix:D, prefix:D:split, blocks:N; '+live' (needs `model`, or a module
    as first argument) drops components that cannot change the output (see `live_components`),
    run on `example_input` (one batch) or a random image of the model's size (an open_clip tower's,
    a timm model's pretrained_cfg input_size, torchvision's 224x224: `factories.input_size`).
    """
    if isinstance(keys_or_state_dict, nn.Module) and model is None:
        model = keys_or_state_dict
    keys = _keys(keys_or_state_dict)
    if not keys:
        raise MMSoupError(
            "There are no floating parameters to partition; pass a non-empty state dict."
        )
    base, _, modifier = scheme.replace(" ", "").lower().partition("+")
    if modifier not in ("", "live"):
        raise MMSoupError(
            f"Unknown scheme modifier '+{modifier}' in {scheme!r}; valid schemes: {SCHEMES}."
        )
    base = ALIASES.get(base, base)
    kind, *args = base.split(":")
    if (
        kind == "prefix"
        and len(args) in (1, 2)
        and args[0].isdigit()
        and args[1:] in ([], ["split"])
    ):
        components = _prefix(keys, int(args[0]), split=args[1:] == ["split"])
    elif kind == "blocks" and len(args) == 1 and args[0].isdigit():
        components = _blocks(keys, int(args[0]))
    else:
        raise MMSoupError(f"Unknown partition scheme {scheme!r}; valid schemes: {SCHEMES}.")
    validate_partition(components, keys)
    if modifier == "live":
        if model is None:
            raise MMSoupError(
                f"Scheme {scheme!r} finds inert components from the model; pass model= (the nn.Module the checkpoint belongs to)."
            )
        components, _ = live_components(components, model, example_input)
    return components


def describe(
    components: Mapping[str, Sequence[str]], state: Mapping[str, torch.Tensor] | nn.Module
) -> pd.DataFrame:
    """A table of the components: name, number of tensors, number of parameters."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    rows = [
        {"component": name, "n_tensors": len(keys), "n_params": sum(state[k].numel() for k in keys)}
        for name, keys in components.items()
    ]
    return pd.DataFrame(rows, columns=["component", "n_tensors", "n_params"])
