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
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mmsoup.errors import MMSoupError

TRUST_HINT = "pass --trust-code (or set trust_code: true in the config) if you trust that code"
KINDS = "an open_clip name (ViT-B-32), 'timm:NAME', 'torchvision:NAME', a Hugging Face model folder with config.json, 'hf:ORG/NAME' (local cache) or 'package.module:function'"


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
    """Whether `name` is `module:function` / `package.module:function` (not timm:, torchvision:, hf:)."""
    kind, sep, rest = name.partition(":")
    return (
        bool(sep)
        and kind not in ("timm", "torchvision", "hf")
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


def check_name(name: str) -> None:
    """Refuse a model name `create_model` does not know, without building anything (one sentence)."""
    name = str(name)
    kind, sep, rest = name.partition(":")
    folder = Path(name).expanduser()
    if kind == "timm" and sep:
        import timm

        if not timm.is_model(rest):
            raise MMSoupError(
                f"Unknown timm model {rest!r}; pick one of timm.list_models(), e.g. 'timm:resnet50'."
            )
    elif kind == "torchvision" and sep:
        import torchvision

        if rest not in torchvision.models.list_models():
            raise MMSoupError(
                f"Unknown torchvision model {rest!r}; pick one of torchvision.models.list_models(), e.g. 'torchvision:resnet18'."
            )
    elif folder.is_dir():
        if not (folder / "config.json").is_file():
            raise MMSoupError(
                f"Model folder {folder} has no config.json; pass a Hugging Face model folder or {KINDS}."
            )
    elif not ((kind == "hf" and sep) or _is_factory(name)):
        import open_clip

        from mmsoup.models import register_configs

        register_configs()
        if name not in open_clip.list_models():
            raise MMSoupError(f"Unknown model {name!r}; use {KINDS}.")


def create_model(
    name: str, image_size: int | None = None, *, trust_code: bool = False, **kwargs: Any
) -> Model:
    """A randomly initialised model named `name` and its evaluation transform (kwargs: the factory's);
    code named by `name` or `kwargs` runs only with `trust_code=True` (`check_trust`)."""
    name = str(name)
    check_trust(name, kwargs, trust_code)
    check_name(name)
    kind, sep, rest = name.partition(":")
    folder = Path(name).expanduser()
    try:
        if kind == "timm" and sep:
            import timm

            module = timm.create_model(rest, pretrained=False, **kwargs)
            return Model(module.eval(), _timm_transform(module, image_size), "timm")
        if kind == "torchvision" and sep:
            import torchvision

            module = torchvision.models.get_model(rest, weights=None, **kwargs).eval()
            return Model(module, _timm_transform(module, image_size or 224), "torchvision")
        if kind == "hf" and sep:
            return _transformers(_hub_folder(rest), trust_code, **kwargs)
        if folder.is_dir():
            return _transformers(folder, trust_code, **kwargs)
        if _is_factory(name):
            # module:function or package.module:function (timm:, torchvision:, hf: came first)
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
        import open_clip

        from mmsoup.models import create_classifier

        module = create_classifier(name, **kwargs)
        visual = module.model.visual
        transform = open_clip.image_transform(
            image_size or visual.image_size, is_train=False, **_clip_stats(visual)
        )
        return Model(module.eval(), transform, "open_clip")
    except TypeError as e:  # a keyword the factory does not take
        raise MMSoupError(
            f"Model {name!r} does not accept the given model_kwargs ({e}); fix model_kwargs in the config."
        ) from e


def _clip_stats(visual: nn.Module) -> dict[str, Any]:
    """open_clip's normalisation constants of a tower (its preprocess config when it has one)."""
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    return {k: cfg[k] for k in ("mean", "std") if k in cfg}
