"""Core: the UNet, the VAE decode and prepare's two VAE encodes, timed apart, as the service runs them.

The full-size random-weight models are loaded through ``MuseTalk.from_pretrained`` (fp16 on CUDA,
which calls ``tune_for_gpu``: channels-last weights, cuDNN autotuning, TF32), so the layout timed
is the service's. Each network is timed at batch 1, 8, 32, 64 and 128 (generated frames; the
encode runs on 2 x batch images, as ``prepare`` does) in four ways: channels-last (the service's
layout) and NCHW (the weights moved back to contiguous), each eagerly and replayed as a CUDA
graph. Every shape is run twice first, outside the timed rounds (cuDNN autotuning, lazy init,
graph capture); then CUDA events time each call and the median is kept. Achieved TFLOP/s come from
the per-frame counts in common.TFLOP_PER_FRAME. torch.compile is tried on the UNet at batch 32
only when a C compiler is on the PATH (Inductor needs one), else the reason is recorded.

Ordered by value: channels-last eager for every batch first, then graphs, then NCHW; a row that
would start too close to the step's deadline is recorded as skipped instead.
"""

from __future__ import annotations

import shutil
import sys

from bench.gpu_steps import common

MODULES = common.MODULES + ("lipsync_runner", "diffusers", "transformers", "safetensors")
STEP = "core"


def _nets(model, batch: int, rng):
    """name -> (callable running the network once on fixed inputs, frames it makes per call)."""
    import torch

    dev, dt = model.device, model.dtype
    lat = torch.from_numpy(rng.normal(size=(batch, 8, 32, 32)).astype("float32")).to(dev, dt)
    cond = torch.from_numpy(rng.normal(size=(batch, model.tokens_per_frame, 384)).astype("float32")).to(dev, dt)
    z = torch.from_numpy(rng.normal(size=(batch, 4, 32, 32)).astype("float32")).to(dev, dt)
    images = torch.from_numpy(rng.uniform(-1, 1, size=(2 * batch, 3, 256, 256)).astype("float32")).to(dev, dt)
    t = model.timestep
    return {
        "unet": lambda: model.unet(lat, t, encoder_hidden_states=cond).sample,
        "vae_decode": lambda: model.vae.decode(z).sample,
        "vae_encode_x2": lambda: model.vae.encode(images).latent_dist.mode(),
    }


def _graphed(fn):
    """Capture fn as a CUDA graph (warmed up on a side stream, as PyTorch's docs do); returns replay."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay, graph


def _set_layout(model, layout: str) -> None:
    import torch

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model.unet.to(memory_format=fmt)
    model.vae.to(memory_format=fmt)


def main() -> int:
    import numpy as np
    import torch

    from lipsync_runner.models.musetalk import MuseTalk

    dev = common.device()
    cuda = dev == "cuda"
    model = MuseTalk.from_pretrained(common.models_dir(), device=dev)  # CUDA: fp16 + tune_for_gpu
    batches = [2] if common.SMOKE else [1, 8, 32, 64, 128]
    repeats = 1 if common.SMOKE else 5
    plans = [("channels_last", False), ("channels_last", True), ("nchw", False), ("nchw", True)]
    if not cuda:
        plans = [p for p in plans if not p[1]]  # CUDA graphs need CUDA
    info = {"device": dev, "dtype": str(model.dtype).removeprefix("torch."), "size": common.size(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "repeats": repeats}
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(0)
    common.emit(STEP, {"info": info})
    rng = np.random.default_rng(0)
    failures = 0
    with torch.inference_mode():
        for layout, graphs in plans:
            _set_layout(model, layout)
            for batch in batches:
                for name, fn in _nets(model, batch, rng).items():
                    row = {"net": name, "batch": batch, "layout": layout, "cuda_graph": graphs}
                    if common.left_s() < (25 if batch >= 64 else 10):
                        common.emit(STEP, {**row, "skipped": "out of the step's time"})
                        continue
                    graph = None
                    try:
                        for _ in range(2):  # autotuning and lazy init, outside the timed rounds
                            fn()
                        call = fn
                        if graphs:
                            call, graph = _graphed(fn)
                            call()
                        common.sync()
                        ms = common.median(common.time_ms(call, repeats=repeats, on_cuda=cuda))
                    except Exception as exc:  # one failing variant must not hide the others
                        failures += 1
                        common.emit(STEP, {**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
                        continue
                    finally:
                        del graph
                    frames_per_s = batch / (ms / 1000)
                    rec = {**row, "ms": round(ms, 3), "ms_per_frame": round(ms / batch, 4),
                           "frames_per_s": round(frames_per_s, 1)}
                    if not common.SMOKE:
                        rec["tflops"] = round(common.TFLOP_PER_FRAME[name] * frames_per_s, 1)
                    common.emit(STEP, rec)
                if cuda:
                    torch.cuda.empty_cache()
        _set_layout(model, "channels_last")
        _compile_row(model, rng, cuda)
    if cuda:
        common.emit(STEP, {"peak_gpu_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20)})
    return 1 if failures else 0


def _compile_row(model, rng, cuda: bool) -> None:
    """torch.compile of the UNet at batch 32, only where Inductor can build its kernels."""
    import torch

    row = {"net": "unet", "batch": 32, "layout": "channels_last", "torch_compile": True}
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cuda or common.SMOKE:
        common.emit(STEP, {**row, "skipped": "torch.compile is timed on CUDA only"})
        return
    if compiler is None:
        common.emit(STEP, {**row, "skipped": "no C compiler (cc, gcc, clang) on the PATH: Inductor cannot build"})
        return
    if common.left_s() < 90:
        common.emit(STEP, {**row, "skipped": f"{common.left_s():.0f} s left, compiling takes about a minute"})
        return
    try:
        compiled = torch.compile(model.unet)
        fn = _nets(model, 32, rng)["unet"]
        original, model.unet = model.unet, compiled
        try:
            for _ in range(3):
                fn()
            ms = common.median(common.time_ms(fn, repeats=5, on_cuda=True))
        finally:
            model.unet = original
    except Exception as exc:
        common.emit(STEP, {**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
        return
    common.emit(STEP, {**row, "compiler": compiler, "ms": round(ms, 3), "ms_per_frame": round(ms / 32, 4),
                       "tflops": round(common.TFLOP_PER_FRAME["unet"] * 32 / (ms / 1000), 1)})


if __name__ == "__main__":
    sys.exit(main())
