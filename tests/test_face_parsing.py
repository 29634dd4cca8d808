"""MuseTalk's face-parsing blend: BiSeNet in MuseTalk's exact state-dict layout, and v1.5's `jaw` mask.

The expected parameter names and shapes are restated here from MuseTalk's
musetalk/utils/face_parsing/model.py and resnet.py, not derived from our module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lipsync_runner.errors import ModelFilesError
from lipsync_runner.render.masks import (
    ContourMasks,
    ParsingMasks,
    box_mask,
    cone_kernel,
    expanded_crop_box,
    load_mask_provider,
    select_classes,
)
from lipsync_runner.models.face_parsing import BiSeNet, FaceParser, parsing_weights_present
from lipsync_runner.models.tiny import write_face_parsing


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def _conv_bn(prefix: str, cin: int, cout: int, k: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.conv.weight": (cout, cin, k, k), **_bn(f"{prefix}.bn", cout)}


def musetalk_bisenet_keys() -> dict[str, tuple[int, ...]]:
    """Every tensor of MuseTalk's BiSeNet(n_classes=19) state dict, with its shape."""
    keys: dict[str, tuple[int, ...]] = {"cp.resnet.conv1.weight": (64, 3, 7, 7), **_bn("cp.resnet.bn1", 64)}
    cin = 64
    for layer, cout in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"cp.resnet.layer{layer}.{block}"
            first_in = cin if block == 0 else cout
            keys[f"{p}.conv1.weight"] = (cout, first_in, 3, 3)
            keys.update(_bn(f"{p}.bn1", cout))
            keys[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            keys.update(_bn(f"{p}.bn2", cout))
            if block == 0 and layer > 1:
                keys[f"{p}.downsample.0.weight"] = (cout, cin, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", cout))
        cin = cout
    for arm, c in (("cp.arm16", 256), ("cp.arm32", 512)):
        keys.update(_conv_bn(f"{arm}.conv", c, 128, 3))
        keys[f"{arm}.conv_atten.weight"] = (128, 128, 1, 1)
        keys.update(_bn(f"{arm}.bn_atten", 128))
    keys.update(_conv_bn("cp.conv_head32", 128, 128, 3))
    keys.update(_conv_bn("cp.conv_head16", 128, 128, 3))
    keys.update(_conv_bn("cp.conv_avg", 512, 128, 1))
    keys.update(_conv_bn("ffm.convblk", 256, 256, 1))
    keys["ffm.conv1.weight"] = (64, 256, 1, 1)
    keys["ffm.conv2.weight"] = (256, 64, 1, 1)
    for head, cin_, mid in (("conv_out", 256, 256), ("conv_out16", 128, 64), ("conv_out32", 128, 64)):
        keys.update(_conv_bn(f"{head}.conv", cin_, mid, 3))
        keys[f"{head}.conv_out.weight"] = (19, mid, 1, 1)
    return keys


@pytest.fixture(scope="module")
def parsing_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parsing-models")
    write_face_parsing(root)
    return root


@pytest.fixture(scope="module")
def provider(parsing_dir: Path) -> ParsingMasks:
    """What a v1.5 job gets when the two parsing files are in its models directory."""
    provider = load_mask_provider(parsing_dir, version="v15")
    assert isinstance(provider, ParsingMasks) and provider.mode == "jaw" and provider.cheek_width == 90
    return provider


def test_state_dict_has_musetalks_exact_names_and_shapes():
    ours = {k: tuple(v.shape) for k, v in BiSeNet().state_dict().items()}
    assert ours == musetalk_bisenet_keys()


def test_weights_in_the_real_files_load_strictly(parsing_dir: Path, provider: ParsingMasks):
    files = sorted(p.name for p in (parsing_dir / "face-parse-bisent").iterdir())
    assert files == ["79999_iter.pth", "resnet18-5c106cde.pth"]
    saved = torch.load(parsing_dir / "face-parse-bisent" / "79999_iter.pth", weights_only=True)
    assert {k: tuple(v.shape) for k, v in saved.items()} == musetalk_bisenet_keys()
    trunk = torch.load(parsing_dir / "face-parse-bisent" / "resnet18-5c106cde.pth", weights_only=True)
    assert "fc.weight" in trunk and "conv1.weight" in trunk and "layer4.1.bn2.running_var" in trunk

    for k, v in provider.parser.net.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)


def test_a_wrong_or_broken_parsing_file_is_named(parsing_dir: Path, tmp_path: Path):
    broken = tmp_path / "m"
    (broken / "face-parse-bisent").mkdir(parents=True)
    (broken / "face-parse-bisent" / "resnet18-5c106cde.pth").symlink_to(
        parsing_dir / "face-parse-bisent" / "resnet18-5c106cde.pth")
    weights = broken / "face-parse-bisent" / "79999_iter.pth"
    sd = torch.load(parsing_dir / "face-parse-bisent" / "79999_iter.pth", weights_only=True)
    sd.pop("conv_out.conv_out.weight")
    torch.save(sd, weights)
    with pytest.raises(ModelFilesError, match="79999_iter.pth does not hold BiSeNet"):
        FaceParser.from_pretrained(broken)
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFilesError, match="79999_iter.pth"):
        FaceParser.from_pretrained(broken)
    (broken / "face-parse-bisent" / "resnet18-5c106cde.pth").unlink()
    assert not parsing_weights_present(broken)
    assert isinstance(load_mask_provider(broken), ContourMasks)  # falls back to landmark contours


# --------------------------------------------------------------------------- the jaw mask


def constructed_parsing() -> np.ndarray:
    """A 512x512 class map of a frontal face in MuseTalk's expanded crop (face box = the middle
    2/3): background, skin (1) rows 120..420 x 150..362, nose (10) in the middle, lips (12, 13)
    below it, hair (17) on top, neck (14) under the chin."""
    p = np.zeros((512, 512), np.uint8)
    p[60:120, 150:362] = 17  # hair
    p[120:420, 150:362] = 1  # skin
    p[420:512, 200:312] = 14  # neck
    p[200:300, 236:276] = 10  # nose, reaching below the middle row (256)
    p[320:340, 206:306] = 12  # upper lip
    p[340:362, 206:306] = 13  # lower lip
    return p


def test_jaw_selection_keeps_dilated_skin_and_lips_but_not_nose_or_hair():
    p = constructed_parsing()
    sel = select_classes(p, "jaw", cheek_width=90)
    assert set(np.unique(sel)) == {0, 255}
    assert sel[380, 256] == 255 and sel[330, 256] == 255 and sel[350, 256] == 255  # chin, both lips
    assert (sel[200:300, 236:276] == 0).all()  # the nose is never blended
    assert sel[90, 256] == 0 and sel[480, 256] == 0 and sel[10, 10] == 0  # hair, neck, background
    # the cone kernel grows skin upward by up to 16 px (into the hair) and downward by up to 6 px
    assert sel[120 - 16, 256] == 255 and sel[120 - 17, 256] == 0
    assert sel[419 + 6, 256] == 255 and sel[419 + 7, 256] == 0
    # the sides (skin x 150..361): dilation adds 10 px; on the outer cheeks (x <= 256 - w,
    # x >= 256 + w) two 35x3 ellipse erosions take 34 px back. v1.5's w = 90 cuts the region at
    # the cheek lines; with w = 80 the eroded edges (140 + 34, 371 - 34) lie inside the lines
    row = np.flatnonzero(sel[300])
    assert (row[0], row[-1]) == (256 - 90 + 1, 256 + 90 - 1)
    row80 = np.flatnonzero(select_classes(p, "jaw", cheek_width=80)[300])
    assert (row80[0], row80[-1]) == (150 - 10 + 34, 361 + 10 - 34)


def test_raw_selection_is_skin_mouth_and_lips():
    p = constructed_parsing()
    sel = select_classes(p, "raw")
    np.testing.assert_array_equal(sel == 255, np.isin(p, (1, 11, 12, 13)))


def test_cone_kernel_is_musetalks():
    k = cone_kernel()
    assert k.shape == (33, 33) and k[:10].sum() == 0
    assert [int(r.sum()) for r in k[10:21]] == list(range(1, 22, 2))
    assert all(int(r.sum()) == 21 for r in k[21:])
    assert (k[:, 16] == 1)[10:].all()  # centred


def test_box_mask_clears_the_upper_half_and_feathers_the_box_borders():
    box = (100, 80, 300, 300)  # w 200, h 220
    crop = expanded_crop_box(box)
    assert crop == (35, 25, 365, 355)  # centre (200, 190), s = int(110 * 1.5) = 165
    full = np.full((512, 512), 255, np.uint8)
    m = box_mask(full, box, crop)
    assert m.shape == (220, 200) and m.dtype == np.float32
    mid = 190 - 80  # the crop's middle row, in box rows
    k = int(0.05 * 330 // 2 * 2) + 1  # 17: the blur reaches 8 px
    assert m[: mid - k // 2].max() == 0.0  # above the boundary nothing is blended
    assert m[mid + k, 100] == pytest.approx(1.0, abs=1e-6)  # well inside: the generated face
    assert 0.3 < m[mid, 100] < 0.7  # the boundary is feathered, not a hard edge
    assert m[-1, 100] < 0.7 and m[mid + k, 0] < 0.7  # so are the box's bottom and sides


def test_parsing_masks_on_a_real_face_are_box_sized_and_empty_above_the_middle(provider: ParsingMasks):
    from lipsync_runner.media.samples import face_image

    frame = face_image()
    boxes = np.array([[170, 70, 280, 190], [-1, -1, -1, -1]])
    masks = provider(np.stack([frame, frame]), boxes)
    assert masks[1] is None
    assert masks[0].shape == (120, 110) and masks[0].dtype == np.float32
    assert masks[0][: 130 - 70 - 4].max() == 0.0  # rows above the box centre (y 130), less the blur


# --------------------------------------------------------------------------- in the pipeline


def test_the_pipeline_blends_with_the_providers_masks_and_restores_detail_when_asked(
        model, media_dir: Path, tmp_path: Path, monkeypatch):
    """A provider whose masks are all zero leaves every frame as it was: the masks are used, not
    blend.py's own (which would paste the random model's grey mouth). `sharpen` reaches the blend."""
    import lipsync_runner.pipeline.job as pipeline
    from lipsync_runner.faces import HaarFaceDetector
    from lipsync_runner.media.ffmpeg import VideoReader
    from lipsync_runner.params import JobParams

    calls = []

    class ZeroMasks:
        name = "zero"

        def __call__(self, frames, boxes, landmarks=None):
            calls.append((frames.shape, boxes.copy()))
            return [np.zeros((b[3] - b[1], b[2] - b[0]), np.float32) for b in boxes]

    detail_calls = []
    real_restore = pipeline.restore_detail
    monkeypatch.setattr(pipeline, "restore_detail", lambda *a: detail_calls.append(a[-1]) or real_restore(*a))
    from lipsync_runner.media.samples import write_speech_like_audio

    speech = write_speech_like_audio(tmp_path / "speech.wav", seconds=0.4)  # 10 frames: enough to see the wiring
    out = tmp_path / "o.mp4"
    result = pipeline.run(model, HaarFaceDetector(), media_dir / "face.mp4", speech, out,
                          pipeline.PipelineOptions(batch_size=8, params=JobParams(sharpen=0.5, silence="generate")),
                          masks=ZeroMasks())
    assert result.frames == 10
    assert sum(shape[0] for shape, _ in calls) == result.frames  # every written frame has the face
    assert all(boxes.shape[1] == 4 and (boxes >= 0).all() for _, boxes in calls)
    assert detail_calls and set(detail_calls) == {0.5}
    with VideoReader(media_dir / "face.mp4") as a, VideoReader(out) as b:
        src = np.stack(list(a))[: result.frames].astype(int)
        got = np.stack(list(b)).astype(int)
    assert np.abs(got - src).mean() < 2.0  # re-encoding only: no face was pasted
