"""Model loading from MuseTalk's on-disk layout, the download command, and the model component."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lipsync_runner.errors import ModelFilesError
from lipsync_runner.models import resolve_layout
from lipsync_runner.models.download import download_models, hub_files
from lipsync_runner.models.musetalk import MuseTalk


@pytest.fixture
def models_copy(models_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(models_dir, tmp_path / "models"))


def test_v15_is_the_default_when_both_versions_are_present(models_dir: Path):
    layout = resolve_layout(models_dir)
    assert layout.version == "v15"
    assert layout.unet_weights == models_dir / "musetalkV15" / "unet.pth"


def test_v1_layout_loads_through_the_same_code(models_dir: Path):
    m = MuseTalk.from_pretrained(models_dir, device="cpu", version="v1")
    assert m.layout.unet_weights == models_dir / "musetalk" / "pytorch_model.bin"
    assert m.unet.config.in_channels == 8 and m.unet.config.cross_attention_dim == 384


def test_v1_only_directory_is_detected(models_copy: Path):
    shutil.rmtree(models_copy / "musetalkV15")
    assert resolve_layout(models_copy).version == "v1"


def test_configs_are_read_from_the_files(model: MuseTalk):
    # the tiny test model differs from MuseTalk's published config only in widths and depths
    assert list(model.unet.config.block_out_channels) == [16, 16, 32, 32]
    assert model.vae.config.scaling_factor == pytest.approx(0.18215)
    assert model.tokens_per_frame == 50


@pytest.mark.parametrize(
    "missing",
    ["musetalkV15/unet.pth", "musetalkV15/musetalk.json", "sd-vae/config.json",
     "sd-vae/diffusion_pytorch_model.safetensors", "whisper/preprocessor_config.json", "whisper/config.json",
     "whisper/model.safetensors"],
)
def test_a_missing_file_is_named_with_the_expected_layout(models_copy: Path, missing: str):
    (models_copy / missing).unlink()
    with pytest.raises(ModelFilesError) as err:
        resolve_layout(models_copy, "v15")
    assert Path(missing).name in err.value.message
    assert "musetalkV15/unet.pth" in err.value.message  # the layout is spelled out
    assert err.value.http_status == 503


def test_no_models_dir_says_how_to_get_one():
    with pytest.raises(ModelFilesError, match="MUSETALK_MODELS_DIR"):
        resolve_layout(None)


def test_nonexistent_models_dir(tmp_path: Path):
    with pytest.raises(ModelFilesError, match="not found"):
        resolve_layout(tmp_path / "nope")


def test_broken_json_is_reported_with_its_file(models_copy: Path):
    (models_copy / "musetalkV15" / "musetalk.json").write_text("{not json")
    with pytest.raises(ModelFilesError, match=r"broken JSON.*musetalk\.json|musetalk\.json.*broken"):
        resolve_layout(models_copy)


def test_corrupt_weights_are_reported_with_their_file(models_copy: Path):
    (models_copy / "musetalkV15" / "unet.pth").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelFilesError, match=r"unet\.pth"):
        MuseTalk.from_pretrained(models_copy, device="cpu")


def test_weights_of_the_wrong_shape_are_rejected(models_copy: Path):
    state = torch.load(models_copy / "musetalkV15" / "unet.pth", weights_only=True)
    state["conv_in.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(state, models_copy / "musetalkV15" / "unet.pth")
    with pytest.raises(ModelFilesError, match=r"unet\.pth"):
        MuseTalk.from_pretrained(models_copy, device="cpu")


def test_cuda_without_a_gpu_is_a_clear_error(models_dir: Path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(Exception, match="no CUDA GPU"):
        MuseTalk.from_pretrained(models_dir, device="cuda")


def test_download_fetches_musetalks_files_into_its_layout(tmp_path: Path):
    calls: list[tuple[str, str, str]] = []

    def fake_hub_download(*, repo_id: str, filename: str, local_dir: str) -> str:
        calls.append((repo_id, filename, local_dir))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")
        return str(target)

    urls: list[str] = []
    root = download_models(tmp_path / "m", version="v15", face_alignment=True, hf_hub_download=fake_hub_download,
                           download_url=lambda url, dst: (urls.append(url), Path(dst).write_bytes(b"x")))
    assert ("TMElyralab/MuseTalk", "musetalkV15/unet.pth", str(root)) in calls
    assert ("stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.safetensors", str(root / "sd-vae")) in calls
    assert ("openai/whisper-tiny", "preprocessor_config.json", str(root / "whisper")) in calls
    assert (root / "musetalkV15" / "unet.pth").is_file()
    assert sorted(p.name for p in (root / "face-alignment").iterdir()) == [
        "2DFAN4-11f355bf06.pth.tar", "s3fd-619a316812.pth"]
    # MuseTalk's face-parsing files, from download_weights.sh's sources (by default)
    assert sorted(p.name for p in (root / "face-parse-bisent").iterdir()) == ["79999_iter.pth", "resnet18-5c106cde.pth"]
    assert "https://download.pytorch.org/models/resnet18-5c106cde.pth" in urls
    assert any("154JgKpzCPW82qINcVieuPH3fZ2e0P812" in u for u in urls)
    assert len(urls) == 4
    # a second run downloads nothing
    calls.clear()
    download_models(root, version="v15", hf_hub_download=fake_hub_download)
    assert calls == []


def test_download_refuses_a_web_page_in_place_of_a_checkpoint(tmp_path: Path):
    def quota_page(url: str, dst: str) -> None:
        Path(dst).write_text("<!DOCTYPE html><html>Google Drive - quota exceeded</html>")

    with pytest.raises(ModelFilesError, match="web page") as err:
        download_models(tmp_path / "m", hf_hub_download=lambda **kw: kw["local_dir"], download_url=quota_page)
    assert "79999_iter.pth" in err.value.message
    assert not list((tmp_path / "m" / "face-parse-bisent").iterdir())  # nothing half-written is left


def test_download_of_all_versions_lists_both_unets():
    files = [f for group in hub_files("all") for f in group.files]
    assert "musetalk/pytorch_model.bin" in files and "musetalkV15/unet.pth" in files


def test_prepare_is_deterministic_and_masks_the_lower_half(model: MuseTalk):
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    a, b = model.prepare(crops), model.prepare(crops)
    assert a.shape == (3, 8, 32, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)  # distribution mean, no sampling
    # changing only the lower half changes the reference latent but not the masked one
    other = crops.copy()
    other[:, 128:] = 0
    c = model.prepare(other)
    np.testing.assert_allclose(c[:, :4, :8], a[:, :4, :8], atol=1e-5)
    assert not np.allclose(c[:, 4:], a[:, 4:])


def test_generate_does_not_depend_on_batch_composition(model: MuseTalk):
    rng = np.random.default_rng(1)
    latents = model.prepare(rng.integers(0, 256, (4, 256, 256, 3), dtype=np.uint8))
    windows = rng.normal(size=(4, 50, 384)).astype(np.float32)
    together = model.generate(latents, windows)
    alone = np.concatenate([model.generate(latents[i: i + 1], windows[i: i + 1]) for i in range(4)])
    assert together.shape == (4, 256, 256, 3) and together.dtype == np.uint8
    assert np.abs(together.astype(int) - alone.astype(int)).max() <= 1


def test_generate_depends_on_the_audio(model: MuseTalk):
    rng = np.random.default_rng(2)
    latents = model.prepare(rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8))
    quiet = np.zeros((1, 50, 384), np.float32)
    loud = rng.normal(size=(1, 50, 384)).astype(np.float32) * 3
    assert not np.array_equal(model.generate(latents, quiet), model.generate(latents, loud))
