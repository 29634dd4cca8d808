"""`prepare` and `generate` give MuseTalk's numbers (random weights, CPU, float32).

The reference restates MuseTalk's own order of operations (musetalk/models/vae.py:
`preprocess_img`, `encode_latents`, `decode_latents`; scripts/inference.py for the UNet call),
one crop at a time, with the distribution mean in place of its unseeded sample.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lipsync_runner.audio import windows as audio
from lipsync_runner.models.musetalk import MuseTalk

TOL = 1e-4


def musetalk_latents(model: MuseTalk, crop_rgb: np.ndarray) -> np.ndarray:
    """One 256x256 RGB crop -> [8, 32, 32], as MuseTalk's VAE.get_latents_for_unet computes it."""
    x = np.asarray([crop_rgb]) / 255.0  # float64
    x = torch.squeeze(torch.FloatTensor(np.transpose(x, (3, 0, 1, 2))))  # [3, 256, 256] float32
    half = torch.zeros((256, 256))
    half[:128, :] = 1  # keep the upper half
    out = []
    for img in (x * (half > 0.5), x):  # masked, then the reference
        img = ((img - 0.5) / 0.5).unsqueeze(0)  # transforms.Normalize(0.5, 0.5)
        with torch.no_grad():
            dist = model.vae.encode(img.to(model.vae.dtype)).latent_dist
        out.append(model.scaling_factor * dist.mode())
    return torch.cat(out, dim=1)[0].numpy()


def musetalk_face(model: MuseTalk, latents: np.ndarray, window: np.ndarray) -> np.ndarray:
    """One frame: UNet at t=0 on [8,32,32] + PE'd [50,384] window, VAE decode -> [256,256,3] uint8 RGB."""
    pe = torch.from_numpy(audio.positional_encoding(window.shape[0], window.shape[1]).copy())
    cond = (torch.from_numpy(window).float() + pe).unsqueeze(0)
    with torch.no_grad():
        pred = model.unet(torch.from_numpy(latents)[None], torch.tensor([0]), encoder_hidden_states=cond).sample
        image = model.vae.decode((1 / model.scaling_factor) * pred).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    image = image.cpu().permute(0, 2, 3, 1).float().numpy()
    return (image * 255).round().astype("uint8")[0]


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    from lipsync_runner.render.crops import crop_faces
    from lipsync_runner.media.samples import face_image

    img = face_image()
    boxes = np.array([[170, 60, 280, 190], [150, 40, 300, 200], [190, 100, 260, 185]])
    return crop_faces(np.stack([img] * 3), boxes)


def test_prepare_matches_musetalks_per_crop_encoding(model: MuseTalk, crops: np.ndarray):
    got = model.prepare(crops)
    want = np.stack([musetalk_latents(model, c) for c in crops])
    assert got.shape == (3, 8, 32, 32) and got.dtype == np.float32
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= TOL * scale
    # the masked half really differs from the reference (the pin is not trivially satisfied)
    assert np.abs(want[:, :4] - want[:, 4:]).max() > 100 * TOL * scale


def test_prepare_does_not_depend_on_the_input_memory_layout(model: MuseTalk, crops: np.ndarray):
    """A channels-last strided view fed to the CPU VAE changed the latents by ~1% of their range."""
    strided = np.ascontiguousarray(crops.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)  # same values, odd strides
    assert not strided.flags.c_contiguous
    np.testing.assert_allclose(model.prepare(strided), model.prepare(crops), rtol=0, atol=1e-6)


def test_generate_matches_musetalks_frame_by_frame(model: MuseTalk, crops: np.ndarray):
    rng = np.random.default_rng(0)
    latents = np.stack([musetalk_latents(model, c) for c in crops[:2]]).astype(np.float32)
    windows = rng.normal(0, 1, (2, 50, 384)).astype(np.float32)
    got = model.generate(latents, windows)
    want = np.stack([musetalk_face(model, lat, w) for lat, w in zip(latents, windows)])
    assert got.shape == (2, 256, 256, 3) and got.dtype == np.uint8
    # uint8 after rounding: a float difference below 1e-4 of the range can flip a rounding, no more
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert (got != want).mean() < 1e-3
    assert not np.array_equal(got[0], got[1])  # the audio and latents matter
