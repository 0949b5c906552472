"""Models by name, with their own evaluation preprocessing: the architectures users keep checkpoints of.

One entry point, `create_model(name, **kwargs)`, randomly initialised (the weights come from the
checkpoints): an open_clip name (`ViT-B-32`, as `mmsoup.models.ImageClassifier`), `timm:NAME`,
`torchvision:NAME`, a Hugging Face model folder with `config.json` (image or sequence
classification; `hf:ORG/NAME` finds one in the local Hugging Face cache, never on the network), or
`package.module:function` for the user's own. The model returns logits (B, C) whatever its library.

A name is data, not code (transformers' `trust_remote_code` convention): a `module:function`
factory, `trust_remote_code` among the keyword arguments and a Hugging Face folder whose
config.json has `auto_map` (custom modelling code) import and run code, so `create_model` refuses
them (`check_trust`, before anything is imported) unless called with `trust_code=True`.

One registry, `FAMILIES`, serves the study and own checkpoints: a row per library recognises its
names, builds the model and its transform, knows its example input size (`blocks:N+live`) and its
head (`num_classes`). To add a library, add one `Family` row with a prefix of its own ('zoo:NAME')
and a `create` returning a `Model`; `check`, `input_size` and `head` are optional (without them
`blocks:N+live` needs an example_input and the class count is the checkpoint's last weight's).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mmsoup.errors import MMSoupError

TRUST_HINT = "pass --trust-code (or set trust_code: true in the config) if you trust that code"


@dataclass
class Model:
    """A model and how its held-out images are prepared (a PIL image -> (C, H, W) tensor)."""

    module: nn.Module
    transform: Callable[[Any], Any] | None
    source: str  # "open_clip", "timm", "torchvision", "transformers" or "python"
    # saved key -> module key, where the library renames keys between its files and its modules
    # (transformers >= 5: ViT's saved `attention.attention.key` is the module's `attention.k_proj`)
    checkpoint_keys: dict[str, str] | None = None


def _hub_folder(repo_id: str) -> Path:
    """The local Hugging Face cache's snapshot of `repo_id` (never downloads)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, a malformed id, ...
        raise MMSoupError(
            f"Model {repo_id!r} is not in the local Hugging Face cache ({type(e).__name__}); "
            "download it once with `huggingface-cli download` or pass a model folder."
        ) from e


def _transformers(folder: Path, trust_code: bool = False, **kwargs: Any) -> Model:
    """A randomly initialised transformers classifier of the folder's config.json; logits out
    (custom code, `auto_map`, only with `trust_code`: checked by `check_trust` before)."""
    try:
        import transformers as tf
    except ImportError as e:
        raise MMSoupError(
            f"{folder} is a Hugging Face model but transformers is not installed; pip install 'mmsoup[own]'."
        ) from e
    if trust_code and _auto_map(folder):
        kwargs.setdefault("trust_remote_code", True)
    remote = {"trust_remote_code": True} if kwargs.get("trust_remote_code") else {}
    try:
        config = tf.AutoConfig.from_pretrained(folder, **kwargs)
    except (ValueError, KeyError, OSError) as e:  # an unknown model_type, a broken config.json
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise MMSoupError(
            f"Hugging Face folder {folder} has a config.json that transformers "
            f"{tf.__version__} cannot read ({first}); check its model_type or upgrade transformers."
        ) from e
    arch = " ".join(config.architectures or [])
    image = "ImageClassification" in arch or (
        not arch and type(config) in tf.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING
    )
    auto = tf.AutoModelForImageClassification if image else tf.AutoModelForSequenceClassification
    try:
        module = auto.from_config(config, **remote).eval()
    except ValueError as e:  # a model_type without a classification head in this library
        raise MMSoupError(
            f"Hugging Face folder {folder}: {type(config).__name__} has no "
            f"{auto.__name__.removeprefix('AutoModelFor')} model in transformers {tf.__version__}; "
            "mmsoup soups image or sequence classifiers."
        ) from e
    module.register_forward_hook(lambda m, args, out: out.logits)  # ModelOutput -> (B, C)
    transform = None
    if image and (folder / "preprocessor_config.json").is_file():
        processor = tf.AutoImageProcessor.from_pretrained(folder, **remote)

        def transform(img):
            return processor(images=img.convert("RGB"), return_tensors="pt")["pixel_values"][0]

        transform.processor = processor  # what it applies: resize, crop, mean, std (mmsoup.own)

    return Model(module, transform, "transformers", _saved_keys(module))


def _saved_keys(module: nn.Module) -> dict[str, str] | None:
    """How transformers names the module's tensors in the files it saves, {saved key: module key}:
    transformers >= 5 renames some architectures' keys on load and back in save_pretrained. None
    when the names agree, or when the conversion is not a renaming of single tensors (then the
    checkpoints must hold the module's own keys)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5: the files hold the module's keys
        return None
    state = module.state_dict()
    saved = revert_weight_conversion(module, dict(state))
    if saved.keys() == state.keys():
        return None
    owners: dict[int, list[str]] = {}
    for key, tensor in state.items():
        owners.setdefault(id(tensor), []).append(key)
    mapping = {}
    for key, tensor in saved.items():
        found = owners.get(id(tensor), [])
        if key in found:  # tied weights: each name stays its own
            mapping[key] = key
        elif len(found) == 1:
            mapping[key] = found[0]
        else:  # merged, split or transformed tensors: not a renaming
            return None
    return mapping if sorted(mapping.values()) == sorted(state) else None


def _timm_transform(module: nn.Module, image_size: int | None) -> Callable[[Any], Any]:
    """timm's evaluation transform from the model's data config (resize, crop, normalise)."""
    from timm.data import create_transform, resolve_data_config

    args = {"input_size": (3, image_size, image_size)} if image_size else {}
    return create_transform(**resolve_data_config(args, model=module))


def _is_factory(name: str) -> bool:
    """Whether `name` is `module:function` / `package.module:function` (no family's prefix:)."""
    kind, sep, rest = name.partition(":")
    return (
        bool(sep)
        and kind not in {prefix for family in FAMILIES for prefix in family.prefixes}
        and not Path(name).expanduser().is_dir()
        and all(part.isidentifier() for part in kind.split("."))
        and rest.isidentifier()
    )


def _auto_map(folder: Path) -> bool:
    """Whether a Hugging Face folder's config.json (or preprocessor_config.json) names custom code
    (`auto_map`)."""
    import json

    for name in ("config.json", "preprocessor_config.json"):
        try:
            config = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # absent or unreadable: transformers reports it when it reads the file
        if isinstance(config, dict) and config.get("auto_map"):
            return True
    return False


def check_trust(name: str, kwargs: dict[str, Any], trust_code: bool, where: str = "") -> None:
    """Refuse what would import or run code named by a config unless `trust_code` (one sentence;
    nothing is imported before): a `module:function` factory, `trust_remote_code` in the model's
    keyword arguments, a Hugging Face folder (or `hf:` cache entry) with `auto_map` in config.json."""
    if trust_code:
        return
    name = str(name)
    if _is_factory(name):
        what = f"model {name!r} is a Python factory, which would be imported and called"
    elif kwargs.get("trust_remote_code"):
        what = "model_kwargs sets trust_remote_code, which runs the model folder's own Python code"
    else:
        kind, sep, rest = name.partition(":")
        folder = Path(name).expanduser()
        if kind == "hf" and sep:
            folder = _hub_folder(rest)
        if not (folder.is_dir() and _auto_map(folder)):
            return
        what = f"model folder {folder} names custom code (auto_map in its config), which would run"
    raise MMSoupError(f"{where}{what}; {TRUST_HINT}.")


# -- the families: one row per model library ------------------------------------------------------
def _after(name: str) -> str:
    """The name after its family's prefix ('timm:resnet50' -> 'resnet50')."""
    return name.partition(":")[2]


def _nothing(*args: Any) -> None:
    """A family's hook with nothing to say (every name checked later, size or head unknown)."""
    return None


def _pair_of(size: Any) -> tuple[int, int]:
    """(height, width) of an image size given as one integer or a pair."""
    return (size, size) if isinstance(size, int) else tuple(size)[:2]


def _in_channels(module: nn.Module, default: int = 3) -> int:
    """The input channels of the model's first convolution (its stem), else `default`."""
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else default


def _clip_check(name: str) -> None:
    import open_clip

    from mmsoup.models import register_configs

    register_configs()
    if name not in open_clip.list_models():
        raise MMSoupError(f"Unknown model {name!r}; use {KINDS}.")


def _clip_create(name: str, image_size: int | None, trust_code: bool, **kwargs: Any) -> Model:
    """The study's classifier (`mmsoup.models.create_classifier`) and open_clip's eval transform."""
    import open_clip

    from mmsoup.models import create_classifier

    module = create_classifier(name, **kwargs)
    visual = module.model.visual
    transform = open_clip.image_transform(
        image_size or visual.image_size, is_train=False, **_clip_stats(visual)
    )
    return Model(module.eval(), transform, "open_clip")


def _clip_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) of a vision tower with an `image_size` attribute (open_clip's; also torchvision's
    and transformers' ViTs): channels from its `conv1` (3 without one)."""
    for module in model.modules():
        size = getattr(module, "image_size", None)
        if size is not None:
            conv = getattr(module, "conv1", None)
            return (conv.in_channels if isinstance(conv, nn.Conv2d) else 3, *_pair_of(size))
    return None


def _clip_stats(visual: nn.Module) -> dict[str, Any]:
    """open_clip's normalisation constants of a tower (its preprocess config when it has one)."""
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    return {k: cfg[k] for k in ("mean", "std") if k in cfg}


def _timm_check(name: str) -> None:
    import timm

    if not timm.is_model(_after(name)):
        raise MMSoupError(
            f"Unknown timm model {_after(name)!r}; pick one of timm.list_models(), e.g. 'timm:resnet50'."
        )


def _timm_create(name: str, image_size: int | None, trust_code: bool, **kwargs: Any) -> Model:
    import timm

    module = timm.create_model(_after(name), pretrained=False, **kwargs)
    return Model(module.eval(), _timm_transform(module, image_size), "timm")


def _timm_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) of a timm model: its pretrained_cfg's input_size, the sides of a patch embedding
    built for another size (`img_size=32`), the channels of its stem."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, Mapping) or not cfg.get("input_size"):
        return None
    channels, h, w = cfg["input_size"]
    size = next((m.img_size for m in model.modules() if getattr(m, "img_size", None)), None)
    h, w = _pair_of(size) if size is not None else (h, w)
    return _in_channels(model, channels), h, w


def _timm_head(name: str) -> str | None:
    """The head's weight per timm's pretrained_cfg (`classifier`: 'fc', 'head.fc', ...)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(_after(name))
    head = getattr(cfg, "classifier", None)
    head = head[0] if isinstance(head, (list, tuple)) else head  # distilled: (head, head_dist)
    return f"{head}.weight" if head else None


def _torchvision_check(name: str) -> None:
    import torchvision

    if _after(name) not in torchvision.models.list_models():
        raise MMSoupError(
            f"Unknown torchvision model {_after(name)!r}; pick one of torchvision.models.list_models(), e.g. 'torchvision:resnet18'."
        )


def _torchvision_create(
    name: str, image_size: int | None, trust_code: bool, **kwargs: Any
) -> Model:
    import torchvision

    module = torchvision.models.get_model(_after(name), weights=None, **kwargs).eval()
    return Model(module, _timm_transform(module, image_size or 224), "torchvision")


def _torchvision_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, 224, 224) for a torchvision classifier: the crop of its ImageNet weights' transforms
    (and of `create_model`'s transform) for all but a few (inception_v3: 299)."""
    if not type(model).__module__.startswith("torchvision.models."):
        return None
    return _in_channels(model), 224, 224


def _hf_folder_of(name: str) -> Path:
    """The model folder a Hugging Face name means: `hf:ORG/NAME` in the local cache, else the path."""
    kind, sep, rest = name.partition(":")
    return _hub_folder(rest) if kind == "hf" and sep else Path(name).expanduser()


def _hf_matches(name: str) -> bool:
    kind, sep, _ = name.partition(":")
    return (kind == "hf" and bool(sep)) or Path(name).expanduser().is_dir()


def _hf_check(name: str) -> None:
    folder = Path(name).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise MMSoupError(
            f"Model folder {folder} has no config.json; pass a Hugging Face model folder or {KINDS}."
        )


def _hf_create(name: str, image_size: int | None, trust_code: bool, **kwargs: Any) -> Model:
    return _transformers(_hf_folder_of(name), trust_code, **kwargs)


def _hf_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) from a transformers image model's config (image_size, num_channels)."""
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "image_size", None)
    if not type(model).__module__.startswith("transformers.") or not size:
        return None
    return getattr(cfg, "num_channels", None) or _in_channels(model), *_pair_of(size)


def _python_create(name: str, image_size: int | None, trust_code: bool, **kwargs: Any) -> Model:
    """`module:function` or `package.module:function` (a family's prefix never is one)."""
    kind, _, rest = name.partition(":")
    try:
        factory = getattr(importlib.import_module(kind), rest)
    except (ImportError, AttributeError) as e:
        raise MMSoupError(
            f"Model factory {name!r} cannot be imported ({e}); check the module path and function name."
        ) from e
    module = factory(**kwargs)
    if not isinstance(module, nn.Module):
        raise MMSoupError(
            f"Model factory {name!r} returned {type(module).__name__}, not a torch nn.Module; return the model."
        )
    return Model(module.eval(), _timm_transform(module, image_size or 224), "python")


@dataclass(frozen=True)
class Family:
    """A model library: its names, how its models are built, their example input, their head."""

    source: str  # Model.source of its models, e.g. "timm"
    names: str  # how its names are written (the list of kinds in error messages, KINDS)
    prefixes: tuple[str, ...]  # 'timm' for names 'timm:NAME'
    # (name, image_size, trust_code, **kwargs) -> Model: randomly initialised, logits out, its
    # evaluation transform of a PIL image (None: unknown); the name is given whole
    create: Callable[..., Model]
    check: Callable[[str], None] = _nothing  # refuse an unknown name in one sentence, build nothing
    # (C, H, W) of one example image for a model of the family (`blocks:N+live`), None: unknown
    input_size: Callable[[nn.Module], tuple[int, int, int] | None] = _nothing
    head: Callable[[str], str | None] = _nothing  # the head's weight key, None: the last weight
    preprocessing: str = "the model's own"  # where its transform comes from (mmsoup.own's line)
    library: str = ""  # the model card's library_name on a hub ("": pytorch)
    matches: Callable[[str], bool] | None = None  # names it takes; None: 'PREFIX:...'

    def takes(self, name: str) -> bool:
        """Whether `name` is one of this family's names."""
        if self.matches is not None:
            return self.matches(name)
        kind, sep, _ = name.partition(":")
        return bool(sep) and kind in self.prefixes


# Matched in order; the study's architectures (open_clip names: no ':', not a folder) come first.
FAMILIES: tuple[Family, ...] = (
    Family(
        "open_clip",
        "an open_clip name (ViT-B-32)",
        prefixes=(),
        create=_clip_create,
        check=_clip_check,
        input_size=_clip_size,
        head=lambda name: "classification_head.weight",  # mmsoup.models.ImageClassifier's
        preprocessing="the model's own (open_clip's preprocess)",
        library="open_clip",
        matches=lambda name: ":" not in name and not Path(name).expanduser().is_dir(),
    ),
    Family(
        "timm",
        "'timm:NAME'",
        prefixes=("timm",),
        create=_timm_create,
        check=_timm_check,
        input_size=_timm_size,
        head=_timm_head,
        preprocessing="the model's own (timm's data config, pretrained_cfg)",
        library="timm",
    ),
    Family(
        "torchvision",
        "'torchvision:NAME'",
        prefixes=("torchvision",),
        create=_torchvision_create,
        check=_torchvision_check,
        input_size=_torchvision_size,
        preprocessing="timm's defaults for a model without a data config",
        library="torchvision",
    ),
    Family(
        "transformers",
        "a Hugging Face model folder with config.json, 'hf:ORG/NAME' (local cache)",
        prefixes=("hf",),
        create=_hf_create,
        check=_hf_check,
        input_size=_hf_size,
        preprocessing="the model's own (its image processor, preprocessor_config.json)",
        library="transformers",
        matches=_hf_matches,
    ),
    Family(
        "python",
        "'package.module:function'",
        prefixes=(),
        create=_python_create,
        preprocessing="timm's defaults for a model without a data config",
        matches=_is_factory,  # `module:function` where module is no family's prefix
    ),
)
KINDS = ", ".join(f.names for f in FAMILIES[:-1]) + f" or {FAMILIES[-1].names}"


def family(name: str) -> Family:
    """The family a model name belongs to (the first row that takes it); unknown: one sentence."""
    name = str(name)
    found = next((f for f in FAMILIES if f.takes(name)), None)
    if found is None:
        raise MMSoupError(f"Unknown model {name!r}; use {KINDS}.")
    return found


def check_name(name: str) -> None:
    """Refuse a model name `create_model` does not know, without building anything (one sentence)."""
    name = str(name)
    family(name).check(name)


def create_model(
    name: str, image_size: int | None = None, *, trust_code: bool = False, **kwargs: Any
) -> Model:
    """A randomly initialised model named `name` and its evaluation transform (kwargs: the factory's);
    code named by `name` or `kwargs` runs only with `trust_code=True` (`check_trust`)."""
    name = str(name)
    check_trust(name, kwargs, trust_code)
    check_name(name)
    try:
        return family(name).create(name, image_size, trust_code, **kwargs)
    except TypeError as e:  # a keyword the factory does not take
        raise MMSoupError(
            f"Model {name!r} does not accept the given model_kwargs ({e}); fix model_kwargs in the config."
        ) from e


def input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) of one example image for `model`, from the first family that knows it, else None."""
    return next((size for f in FAMILIES if (size := f.input_size(model)) is not None), None)


def num_classes(state: Mapping[str, Any], name: str) -> int:
    """The number of classes of a checkpoint of model `name`: the rows of its family's head weight
    (without a known head: the checkpoint's last weight of two or more dimensions)."""
    key = family(name).head(str(name))
    if key is None:
        key = next(
            (k for k, v in reversed(state.items()) if k.endswith("weight") and v.ndim >= 2), ""
        )
    if key not in state:
        raise MMSoupError(
            f"The checkpoint has no classification head {key or 'weight'!r} for model {name!r}; pass a checkpoint of that model."
        )
    return int(state[key].shape[0])
