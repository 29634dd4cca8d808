"""BiSeNet face parsing (19 CelebAMask-HQ classes), the network MuseTalk blends with.

The modules and their attribute names follow MuseTalk's ``musetalk/utils/face_parsing/model.py``
and ``resnet.py`` (from zllrunning/face-parsing.PyTorch), so that the published
``face-parse-bisent/79999_iter.pth`` loads with ``strict=True``: ``cp.resnet.*`` (a ResNet-18
trunk), ``cp.arm16`` / ``cp.arm32`` (attention refinement), ``cp.conv_head16/32``, ``cp.conv_avg``,
``ffm`` (feature fusion), ``conv_out`` / ``conv_out16`` / ``conv_out32`` (class heads). The
written code is this project's own.

``resnet18-5c106cde.pth`` (torchvision's ImageNet ResNet-18) is MuseTalk's initialisation of the
trunk; ``79999_iter.pth`` then replaces every weight. Both files must be present, as in
MuseTalk; the first is checked to hold a ResNet-18 and loaded the way MuseTalk does (``fc.*``
skipped), then the second strictly.

Only the main head's output is computed at inference (``conv_out16``/``conv_out32`` are the
training-time auxiliary heads; MuseTalk discards their outputs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lipsync_runner.errors import ModelFilesError
from lipsync_runner.models.layout import FACE_PARSING_DIR as PARSING_DIR

PARSING_WEIGHTS = "79999_iter.pth"
RESNET_WEIGHTS = "resnet18-5c106cde.pth"
NUM_CLASSES = 19
INPUT_SIZE = 512  # MuseTalk parses every crop at 512x512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: CelebAMask-HQ labels, by index, as the parsing network outputs them.
CLASSES = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
           "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")


class ConvBNReLU(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chan, out_chan, kernel_size=ks, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chan, out_chan, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chan)
        self.conv2 = nn.Conv2d(out_chan, out_chan, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chan)
        self.downsample = None
        if in_chan != out_chan or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(in_chan, out_chan, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_chan))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _layer(in_chan: int, out_chan: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_chan, out_chan, stride), *(BasicBlock(out_chan, out_chan) for _ in range(blocks - 1)))


class Resnet18(nn.Module):
    """ResNet-18 trunk returning the 1/8, 1/16 and 1/32 feature maps (no classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _layer(64, 64, 2, 1)
        self.layer2 = _layer(64, 128, 2, 2)
        self.layer3 = _layer(128, 256, 2, 2)
        self.layer4 = _layer(256, 512, 2, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class AttentionRefinementModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_chan, out_chan)
        self.conv_atten = nn.Conv2d(out_chan, out_chan, kernel_size=1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(F.avg_pool2d(feat, feat.shape[2:]))))
        return feat * atten


class ContextPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.resnet = Resnet18()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(F.avg_pool2d(feat32, feat32.shape[2:]))
        feat32_sum = self.arm32(feat32) + F.interpolate(avg, feat32.shape[2:], mode="nearest")
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, feat16.shape[2:], mode="nearest"))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, feat8.shape[2:], mode="nearest"))
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(in_chan, out_chan, ks=1, padding=0)
        self.conv1 = nn.Conv2d(out_chan, out_chan // 4, kernel_size=1, bias=False)
        self.conv2 = nn.Conv2d(out_chan // 4, out_chan, kernel_size=1, bias=False)

    def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(F.avg_pool2d(feat, feat.shape[2:])))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    def __init__(self, in_chan: int, mid_chan: int, n_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_chan, mid_chan)
        self.conv_out = nn.Conv2d(mid_chan, n_classes, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """Face parsing: ``[B, 3, H, W]`` ImageNet-normalised RGB -> ``[B, 19, H, W]`` class logits."""

    def __init__(self, n_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, n_classes)
        self.conv_out16 = BiSeNetOutput(128, 64, n_classes)  # auxiliary heads: weights only
        self.conv_out32 = BiSeNetOutput(128, 64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat8, feat_cp8, _ = self.cp(x)
        out = self.conv_out(self.ffm(feat8, feat_cp8))  # the 1/8 resnet feature stands in for the spatial path
        return F.interpolate(out, x.shape[2:], mode="bilinear", align_corners=True)


def parsing_files(models_dir: Path | str) -> tuple[Path, Path]:
    base = Path(models_dir) / PARSING_DIR
    return base / PARSING_WEIGHTS, base / RESNET_WEIGHTS


def parsing_weights_present(models_dir: Path | str | None) -> bool:
    """True when both face-parsing files are in ``<models_dir>/face-parse-bisent/``."""
    if models_dir is None:
        return False
    return all(p.is_file() and p.stat().st_size > 0 for p in parsing_files(models_dir))


def _load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelFilesError(f"face-parsing model file {path.name} is missing from {path.parent} "
                              f"(expected {PARSING_DIR}/{PARSING_WEIGHTS} and {PARSING_DIR}/{RESNET_WEIGHTS})")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFilesError(f"cannot load model file {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelFilesError(f"model file {path} is not a state dict")
    return sd


class FaceParser:
    """The parsing network on one device: RGB uint8 images in, class maps out (numpy)."""

    def __init__(self, net: BiSeNet, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.net = net.to(device, dtype).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dtype = dtype
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @classmethod
    def from_pretrained(cls, models_dir: Path | str, *, device: str = "cpu",
                        dtype: torch.dtype | None = None) -> "FaceParser":
        weights, resnet = parsing_files(models_dir)
        net = BiSeNet()
        trunk = {k: v for k, v in _load(resnet).items() if not k.startswith("fc.")}
        try:
            # torchvision's file predates num_batches_tracked: strict on everything it does hold
            missing, unexpected = net.cp.resnet.load_state_dict(trunk, strict=False)
            if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
                raise RuntimeError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        except RuntimeError as exc:
            raise ModelFilesError(f"model file {resnet} does not hold a ResNet-18: {str(exc).splitlines()[0]}") from None
        try:
            net.load_state_dict(_load(weights), strict=True)
        except RuntimeError as exc:
            raise ModelFilesError(f"model file {weights} does not hold BiSeNet face-parsing weights: "
                                  f"{str(exc).splitlines()[0]}") from None
        if dtype is None:
            dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
        return cls(net, device, dtype)

    @torch.inference_mode()
    def parse(self, images: np.ndarray) -> np.ndarray:
        """``[B, 512, 512, 3]`` uint8 RGB -> ``[B, 512, 512]`` uint8 class indices (argmax)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div(255.0)  # torchvision ToTensor
        x = ((x - self._mean) / self._std).contiguous().to(self.dtype)
        return self.net(x).argmax(1).to(torch.uint8).cpu().numpy()
