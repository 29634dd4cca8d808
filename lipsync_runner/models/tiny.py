"""Tiny random-weight MuseTalk models (and face parsing) in the real on-disk layout.

Tests and CPU benchmarks use these: same file names, same formats, same tensor shapes
at every boundary (8-channel 32x32 latents, 384-wide audio tokens, 256x256 crops), just
far fewer channels and layers, so the loading code cannot tell them from the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The published musetalk.json (TMElyralab/MuseTalk, v1.0 and v1.5 share it).
FULL_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stabilityai/sd-vae-ft-mse's config.json.
FULL_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# openai/whisper-tiny's encoder dimensions (the decoder is never run).
FULL_WHISPER_CONFIG: dict[str, Any] = {
    "d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536,
    "decoder_layers": 4, "decoder_attention_heads": 6, "decoder_ffn_dim": 1536, "num_mel_bins": 80,
    "max_source_positions": 1500, "max_target_positions": 448, "vocab_size": 51865,
}

TINY_UNET_CONFIG: dict[str, Any] = {
    **FULL_UNET_CONFIG,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
TINY_VAE_CONFIG: dict[str, Any] = {**FULL_VAE_CONFIG, "block_out_channels": [4, 4, 8, 8], "layers_per_block": 1,
                                   "norm_num_groups": 2}
TINY_WHISPER_CONFIG: dict[str, Any] = {
    **FULL_WHISPER_CONFIG, "encoder_ffn_dim": 64, "encoder_attention_heads": 2,
    "decoder_layers": 1, "decoder_ffn_dim": 32, "decoder_attention_heads": 2, "vocab_size": 64,
    "max_target_positions": 16, "decoder_start_token_id": 1, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}


def write_models_dir(root: Path | str, *, size: str = "tiny", versions: tuple[str, ...] = ("v15",),
                     seed: int = 0) -> Path:
    """Write a random-weight MuseTalk models directory in the exact real layout; returns root."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    tiny = size == "tiny"
    root = Path(root)
    torch.manual_seed(seed)
    unet_config = TINY_UNET_CONFIG if tiny else FULL_UNET_CONFIG
    unet = UNet2DConditionModel.from_config(unet_config)
    folders = {"v15": ("musetalkV15", "unet.pth"), "v1": ("musetalk", "pytorch_model.bin")}
    for version in versions:
        folder, weights = folders[version]
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "musetalk.json").write_text(json.dumps(unet_config, indent=2))
        torch.save(unet.state_dict(), root / folder / weights)  # MuseTalk ships a plain state dict

    vae = AutoencoderKL.from_config(TINY_VAE_CONFIG if tiny else FULL_VAE_CONFIG)
    vae.save_pretrained(root / "sd-vae")

    whisper = WhisperModel(WhisperConfig(**(TINY_WHISPER_CONFIG if tiny else FULL_WHISPER_CONFIG)))
    whisper.save_pretrained(root / "whisper")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(root / "whisper")
    return root



# ---------------------------------------------------------------- face parsing


def write_face_parsing(models_dir: Path | str, *, seed: int = 0) -> Path:
    """Random-weight BiSeNet face parsing in MuseTalk's files: ``face-parse-bisent/79999_iter.pth``
    (the whole network's state dict) and ``resnet18-5c106cde.pth`` (torchvision's ResNet-18 layout:
    no ``num_batches_tracked``, with the ImageNet ``fc`` classifier). Full size: the network has
    no config file, so it cannot be shrunk (about 100 MB together)."""
    import torch

    from lipsync_runner.models.face_parsing import PARSING_DIR, PARSING_WEIGHTS, RESNET_WEIGHTS, BiSeNet

    torch.manual_seed(seed)
    folder = Path(models_dir) / PARSING_DIR
    folder.mkdir(parents=True, exist_ok=True)
    net = BiSeNet().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as trained weights have
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), folder / PARSING_WEIGHTS)
    trunk = {k: v for k, v in net.cp.resnet.state_dict().items() if not k.endswith("num_batches_tracked")}
    trunk["fc.weight"] = torch.randn(1000, 512) * 0.01
    trunk["fc.bias"] = torch.zeros(1000)
    torch.save(trunk, folder / RESNET_WEIGHTS)
    return folder
