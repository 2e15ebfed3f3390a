"""Tests for crop_clusterd.embed: registry, devices, and the three built-in embedders."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image

from crop_clusterd import embed
from crop_clusterd.embed import (
    Embedder,
    EmbedderError,
    EmbedderOptions,
    MissingDependencyError,
    ModelNotAvailableError,
    UnknownEmbedderError,
    available_embedders,
    create_embedder,
    register,
    resolve_device,
)
from crop_clusterd.images import load_rgb

# TorchScript is deprecated in recent torch but is the format the brief asks us to read.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


def _unit_rows(vectors: npt.NDArray[np.float32]) -> None:
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def _normalised(features: torch.Tensor) -> npt.NDArray[np.float32]:
    return torch.nn.functional.normalize(features.float(), dim=1).numpy()


def _images(n: int, size: tuple[int, int] = (40, 30)) -> list[Image.Image]:
    rng = np.random.default_rng(n)
    return [
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
        for _ in range(n)
    ]


# --- registry and devices -----------------------------------------------------------------


def test_builtins_registered() -> None:
    assert {"efficientnet-lite0", "dino", "hierarchical"} <= set(available_embedders())
    assert embed.DEFAULT_EMBEDDER in available_embedders()
    assert embed.EMBEDDERS["dino"] is embed.DinoEmbedder


def test_unknown_embedder_suggests_close_name() -> None:
    with pytest.raises(UnknownEmbedderError) as info:
        create_embedder("dinov", EmbedderOptions())
    message = str(info.value)
    assert "did you mean 'dino'?" in message
    assert "efficientnet-lite0" in message and "hierarchical" in message
    assert isinstance(info.value, ValueError)


def test_unknown_embedder_without_close_match_lists_names() -> None:
    with pytest.raises(UnknownEmbedderError) as info:
        create_embedder("zzzzzz", EmbedderOptions())
    assert "did you mean" not in str(info.value)
    assert "dino" in str(info.value)


class _Counting(Embedder):
    """A fake that counts loads; its features are each image's mean colour."""

    name: ClassVar[str] = "counting-test"

    def __init__(self, options: EmbedderOptions) -> None:
        super().__init__(options)
        self.loads = 0

    def _load(self) -> None:
        self.loads += 1
        self._dim = 3

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.mean(dim=(2, 3))


def test_register_and_create() -> None:
    register(_Counting)
    try:
        assert "counting-test" in available_embedders()
        made = create_embedder("counting-test", EmbedderOptions(device="cpu"))
        assert isinstance(made, _Counting)
        assert made.loads == 0  # construction does not load weights
    finally:
        embed.unregister("counting-test")


def test_register_rejects_name_clash() -> None:
    class Impostor(_Counting):
        name: ClassVar[str] = "dino"

    with pytest.raises(ValueError, match="already registered"):
        register(Impostor)
    assert embed.EMBEDDERS["dino"] is embed.DinoEmbedder


def test_registry_view_is_read_only() -> None:
    with pytest.raises(TypeError):
        embed.EMBEDDERS["x"] = _Counting  # type: ignore[index]


def test_load_runs_once_across_threads() -> None:
    fake = _Counting(EmbedderOptions(device="cpu"))
    threads = [threading.Thread(target=fake.load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    fake.load()
    assert fake.loads == 1
    assert fake.dim == 3


def test_embed_normalises_and_returns_float32_on_cpu() -> None:
    fake = _Counting(EmbedderOptions(device="cpu"))
    batch = torch.stack([fake.preprocess(img) for img in _images(3)])
    out = fake.embed(batch)
    assert out.shape == (3, 3)
    _unit_rows(out)
    np.testing.assert_allclose(out, _normalised(batch.mean(dim=(2, 3))), atol=1e-6)
    assert fake.embed(batch[:0]).shape == (0, 3)
    with pytest.raises(ValueError, match="n x C x H x W"):
        fake.embed(batch[0])


def test_describe_mentions_name_device_and_dim() -> None:
    fake = _Counting(EmbedderOptions(device="cpu", model="some/model"))
    assert fake.describe() == "counting-test model=some/model device=cpu"
    fake.load()
    assert fake.describe().endswith("dim=3")


def test_resolve_device_auto() -> None:
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None) == torch.device(expected)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_cuda_without_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(ValueError, match="CUDA is not available"):
        embed.EfficientNetLite0Embedder(EmbedderOptions(device="cuda"))


def test_resolve_device_garbage() -> None:
    with pytest.raises(ValueError, match="unknown device 'gpu-please'"):
        resolve_device("gpu-please")


# --- dino -----------------------------------------------------------------------------------


def test_dino_offline_from_local_folder(tiny_dino_dir: Path) -> None:
    from transformers import AutoModel

    dino = create_embedder("dino", EmbedderOptions(model=str(tiny_dino_dir), device="cpu"))
    images = _images(3, size=(70, 40))
    tensors = [dino.preprocess(img) for img in images]
    assert tensors[0].shape == (3, 56, 56) and tensors[0].dtype == torch.float32
    out = dino.embed(torch.stack(tensors))
    assert out.shape == (3, 32) and dino.dim == 32
    _unit_rows(out)
    reference = AutoModel.from_pretrained(tiny_dino_dir, local_files_only=True).eval()
    with torch.no_grad():
        pooled = reference(pixel_values=torch.stack(tensors)).pooler_output
    np.testing.assert_allclose(out, _normalised(pooled), atol=1e-5)


def test_dino_missing_model_explains_staging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dino = create_embedder("dino", EmbedderOptions(model="nobody/no-such-model", device="cpu"))
    with pytest.raises(ModelNotAvailableError) as info:
        dino.load()
    message = str(info.value)
    assert "'nobody/no-such-model' is not available" in message
    assert "--allow-download" in message and "save_pretrained" in message


def test_dino_default_model_id() -> None:
    dino = create_embedder("dino", EmbedderOptions(device="cpu"))
    assert isinstance(dino, embed.DinoEmbedder)
    assert dino._model_id == "facebook/dinov2-base"


# --- hierarchical ---------------------------------------------------------------------------


class _TinyClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)
        self.fc = torch.nn.Linear(6, 4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.forward_features(x).mean(dim=(2, 3)))
        return out


class _TinyBackbone(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x.mean(dim=(2, 3)))
        return out


def test_torchscript_uses_forward_features(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = _TinyClassifier().eval()
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    hier = create_embedder(
        "hierarchical", EmbedderOptions(model=str(path), device="cpu", image_size=32)
    )
    batch = torch.stack([hier.preprocess(img) for img in _images(2)])
    assert batch.shape == (2, 3, 32, 32)
    out = hier.embed(batch)
    assert out.shape == (2, 6) and hier.dim == 6  # features, not the 4 class scores
    with torch.no_grad():
        expected = module.forward_features(batch).mean(dim=(2, 3))
    np.testing.assert_allclose(out, _normalised(expected), atol=1e-5)


def test_torchscript_without_forward_features_uses_forward(tmp_path: Path) -> None:
    module = _TinyBackbone().eval()
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    hier = create_embedder("hierarchical", EmbedderOptions(model=str(path), device="cpu"))
    batch = torch.stack([hier.preprocess(img) for img in _images(2)])
    assert batch.shape == (2, 3, 224, 224)
    with torch.no_grad():
        expected = module(batch)
    np.testing.assert_allclose(hier.embed(batch), _normalised(expected), atol=1e-5)


def test_hierarchical_imagenet_normalisation() -> None:
    hier = create_embedder("hierarchical", EmbedderOptions(device="cpu", image_size=8))
    tensor = hier.preprocess(Image.new("RGB", (20, 10), (255, 0, 124)))
    assert tensor.shape == (3, 8, 8)
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (124 / 255 - 0.406) / 0.225]
    np.testing.assert_allclose(tensor[:, 4, 4].numpy(), expected, atol=1e-5)


def test_efficientnet_lite_state_dict(tmp_path: Path) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(1)
    trained = EfficientNet.from_name("efficientnet-lite0", num_classes=7, image_size=64).eval()
    path = tmp_path / "insects.pth"
    torch.save(trained.state_dict(), path)
    torch.manual_seed(2)  # the embedder's fresh model starts from other random weights
    hier = create_embedder(
        "hierarchical",
        EmbedderOptions(model=str(path), arch="efficientnet-lite0", device="cpu", image_size=64),
    )
    batch = torch.stack([hier.preprocess(img) for img in _images(2)])
    out = hier.embed(batch)
    assert out.shape == (2, 1280)
    with torch.no_grad():
        expected = trained.extract_features(batch).mean(dim=(2, 3))
    np.testing.assert_allclose(out, _normalised(expected), atol=1e-4)


def test_state_dict_for_other_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(_TinyBackbone().state_dict(), path)
    hier = create_embedder(
        "hierarchical",
        EmbedderOptions(model=str(path), arch="efficientnet-lite0", device="cpu"),
    )
    with pytest.raises(EmbedderError, match="do not fit this architecture"):
        hier.load()


def test_hierarchical_needs_a_model_file(tmp_path: Path) -> None:
    with pytest.raises(EmbedderError, match="needs a model file"):
        create_embedder("hierarchical", EmbedderOptions(device="cpu")).load()
    missing = create_embedder(
        "hierarchical", EmbedderOptions(model=str(tmp_path / "nope.pt"), device="cpu")
    )
    with pytest.raises(ModelNotAvailableError, match="model file not found"):
        missing.load()


def test_state_dict_without_arch_is_not_torchscript(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    torch.save(_TinyBackbone().state_dict(), path)
    hier = create_embedder("hierarchical", EmbedderOptions(model=str(path), device="cpu"))
    with pytest.raises(EmbedderError, match=r"not a TorchScript file.*--arch"):
        hier.load()


def test_generic_arch_needs_timm_or_torchvision(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    try:
        import timm  # noqa: F401

        pytest.skip("timm is installed")
    except ImportError:
        pass
    try:
        import torchvision  # noqa: F401

        pytest.skip("torchvision is installed")
    except ImportError:
        pass
    path = tmp_path / "w.pth"
    torch.save(_TinyBackbone().state_dict(), path)
    hier = create_embedder(
        "hierarchical", EmbedderOptions(model=str(path), arch="resnet50", device="cpu")
    )
    with pytest.raises(MissingDependencyError, match="pip install timm"):
        hier.load()


# --- efficientnet-lite0 (bundled default) ---------------------------------------------------


@pytest.fixture(scope="module")
def lite0() -> Embedder:
    embedder = create_embedder("efficientnet-lite0", EmbedderOptions(device="cpu"))
    embedder.load()
    return embedder


def test_lite0_letterbox_pads_with_background_and_uses_tf_scaling() -> None:
    lite = create_embedder(
        "efficientnet-lite0", EmbedderOptions(device="cpu", background=(255, 127, 0))
    )
    assert not lite.loaded  # preprocessing needs no weights
    tensor = lite.preprocess(Image.new("RGB", (100, 20), (127, 127, 127)))
    assert tensor.shape == (3, 224, 224)
    # Padding rows (top) carry the background, scaled as (x - 127) / 128.
    np.testing.assert_allclose(tensor[:, 0, 0].numpy(), [1.0, 0.0, -127 / 128], atol=1e-6)
    # The image itself is centred and not stretched: 100x20 -> 224x45 around the middle.
    np.testing.assert_allclose(tensor[:, 112, 0].numpy(), [0.0, 0.0, 0.0], atol=1e-6)
    assert tensor[0, 112 - 25, 100] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def seed_batch(seed_crops: list[Path], lite0: Embedder) -> torch.Tensor:
    return torch.stack([lite0.preprocess(load_rgb(path)) for path in seed_crops])


@pytest.fixture(scope="module")
def seed_vectors(seed_batch: torch.Tensor, lite0: Embedder) -> npt.NDArray[np.float32]:
    return lite0.embed(seed_batch)


def test_lite0_on_seed_crops_shape_and_norm(
    seed_crops: list[Path], seed_vectors: npt.NDArray[np.float32], lite0: Embedder
) -> None:
    assert seed_vectors.shape == (len(seed_crops), 1280)
    assert lite0.dim == 1280
    _unit_rows(seed_vectors)
    # Real crops of different insects must not collapse onto one direction.
    similarity = seed_vectors @ seed_vectors.T
    assert similarity[np.triu_indices(len(seed_crops), k=1)].min() < 0.9


def test_lite0_is_deterministic(
    seed_batch: torch.Tensor, seed_vectors: npt.NDArray[np.float32], lite0: Embedder
) -> None:
    np.testing.assert_allclose(lite0.embed(seed_batch), seed_vectors, atol=1e-6)


def test_lite0_batch_composition_does_not_matter(
    seed_batch: torch.Tensor, seed_vectors: npt.NDArray[np.float32], lite0: Embedder
) -> None:
    picks = [7, 0, len(seed_batch) - 1]
    np.testing.assert_allclose(lite0.embed(seed_batch[picks]), seed_vectors[picks], atol=1e-4)
    np.testing.assert_allclose(lite0.embed(seed_batch[3:4]), seed_vectors[3:4], atol=1e-4)


def _rgba_file(path: Path, colour_seed: int, opaque_seed: int = 0) -> None:
    """An insect-like opaque ellipse; colour under alpha 0 comes from ``colour_seed``."""
    height, width = 48, 64
    yy, xx = np.mgrid[:height, :width]
    inside = ((xx - 32) / 24) ** 2 + ((yy - 24) / 14) ** 2 <= 1
    rgba = np.random.default_rng(colour_seed).integers(0, 256, (height, width, 4), np.uint8)
    rgba[inside, :3] = np.random.default_rng(opaque_seed).integers(
        0, 256, (int(inside.sum()), 3), np.uint8
    )
    rgba[..., 3] = np.where(inside, 255, 0)
    Image.fromarray(rgba, "RGBA").save(path)


def test_hidden_rgb_under_transparency_does_not_change_embedding(
    tmp_path: Path, lite0: Embedder
) -> None:
    _rgba_file(tmp_path / "a.png", colour_seed=1)
    _rgba_file(tmp_path / "b.png", colour_seed=2)
    _rgba_file(tmp_path / "c.png", colour_seed=1, opaque_seed=5)
    batch = torch.stack([lite0.preprocess(load_rgb(tmp_path / f"{n}.png")) for n in "abc"])
    a, b, c = lite0.embed(batch)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # Control: changing the visible (opaque) pixels does move the embedding.
    assert float(a @ c) < 0.999
