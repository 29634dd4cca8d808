"""The API side's ceilings, removed (issue 21): each test fails if its ceiling came back.

* a face detector per running job, not one per process behind a lock; FAN on the GPU when it can;
* several chunks of one job at the model at once, with the output of one chunk at a time;
* prepare and generate in one round trip, frames to the runner as uint8 crops;
* batch sizes bucketed at the runner;
* job workers and x264 threads from the cores the replica may use (settings still win);
* NVDEC and a C compiler in the image, and torch.compile refused without one.
"""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from lipsync_runner import config
from lipsync_runner.config import RunnerSettings, ServiceSettings, Settings, available_cores
from lipsync_runner.faces import HaarFaceDetector
from lipsync_runner.faces.detectors.fan import FACE_ALIGNMENT_DIR, FAN_FILENAME, S3FD_FILENAME
from lipsync_runner.faces.detectors.pool import DetectorPool, detector_device
from lipsync_runner.media import ffmpeg
from lipsync_runner.media.hwcodecs import video_codecs
from lipsync_runner.pipeline.job import PipelineOptions, run
from lipsync_runner.serving import executor as executor_module
from lipsync_runner.serving.executor import JobExecutor
from lipsync_runner.serving.packing import RENDER_ROW_BYTES, pack_generate, pack_render, unpack_render
from lipsync_runner.serving.remote import RemoteModel, runner_submitter
from lipsync_runner.serving.runner import GPU_BUCKETS, RunnerCore

from .plan_media import recorded  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]


def runner_with(model, **settings) -> RunnerCore:
    core = RunnerCore(RunnerSettings(device="cpu", **settings), load=False)
    core.model, core.state = model, "ready"
    return core


# ------------------------------------------------------------------ a detector per job


def test_jobs_running_together_each_get_a_detector_of_their_own():
    made = []
    pool = DetectorPool(lambda: made.append(HaarFaceDetector()) or made[-1], size=3)
    inside = threading.Barrier(3, timeout=10)
    leased = []

    def job():
        with pool.lease() as detector:
            leased.append(detector)
            inside.wait()  # all three hold theirs at the same time

    threads = [threading.Thread(target=job) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(d) for d in leased}) == 3 and len(made) == 3
    with pool.lease() as again:  # kept for the next jobs, not built again
        assert again in made and len(made) == 3


def test_a_job_beyond_the_pool_waits_for_a_detector_to_come_back():
    pool = DetectorPool(HaarFaceDetector, size=1)
    got = threading.Event()
    with pool.lease() as first:
        waiter = threading.Thread(target=lambda: pool.lease().__enter__() is first and got.set())
        waiter.start()
        assert not got.wait(0.3)  # never two users of one detector
    waiter.join(10)
    assert got.is_set() and pool.created == 1


def test_a_short_use_beside_busy_jobs_gets_a_spare_and_never_waits():
    """A live session opening its avatar while every job holds a detector: a spare, dropped after."""
    pool = DetectorPool(HaarFaceDetector, size=1)
    with pool.lease() as held:
        with pool.lease_or_spare() as spare:  # would block forever if it waited for the job's
            assert spare is not held
    assert pool.created == 1
    with pool.lease_or_spare() as idle:  # the pool's own when one is idle
        assert idle is held


def test_the_executor_sizes_its_detectors_to_the_job_workers_and_the_preview_slots():
    settings = Settings(service=ServiceSettings(job_workers=5, max_concurrent_previews=2),
                        runner=RunnerSettings(face_detector="haar"))
    executor = JobExecutor(settings, runner=None, files=None, scratch=None, integration=None, avatars=None)
    assert executor.detectors.size == 7
    with executor.detectors.lease() as a, executor.detectors.lease() as b:
        assert a is not b and isinstance(a, HaarFaceDetector)


def _fan_weights(root: Path) -> Path:
    folder = root / FACE_ALIGNMENT_DIR
    folder.mkdir(parents=True)
    for name in (S3FD_FILENAME, FAN_FILENAME):
        (folder / name).write_bytes(b"weights")
    return root


def test_fan_runs_on_the_gpu_when_its_weights_are_there_and_cuda_is(tmp_path, monkeypatch):
    import torch

    with_fan, without = _fan_weights(tmp_path / "a"), tmp_path / "b"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert detector_device("auto", "auto", with_fan) == "cuda"
    assert detector_device("auto", "fan", with_fan) == "cuda"
    assert detector_device("auto", "auto", without) == "cpu"  # no FAN: MediaPipe or Haar, CPU detectors
    assert detector_device("auto", "haar", with_fan) == "cpu"
    assert detector_device("cpu", "fan", with_fan) == "cpu"  # the setting wins
    assert detector_device("cuda:1", "fan", with_fan) == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert detector_device("auto", "fan", with_fan) == "cpu"

    # and the executor loads its detectors there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []
    monkeypatch.setattr(executor_module, "load_face_detector", lambda kind, models_dir, device: asked.append(device))
    settings = Settings(runner=RunnerSettings(face_detector="fan").model_copy(update={"models_dir": with_fan}))
    JobExecutor(settings, runner=None, files=None, scratch=None, integration=None, avatars=None)._load_detector()
    assert asked == ["cuda"]


# ------------------------------------------------------------------ chunks in flight, one round trip


class Sizes:
    """A model whose every output row is a function of its input row alone (so padding that leaked
    into the results would show), recording the batch sizes it sees; out of memory above `limit`."""

    info = "a row-wise stand-in on the CPU"

    def __init__(self, limit: int | None = None) -> None:
        self.limit, self.seen = limit, []
        self.unet = type("Unet", (), {"config": type("Config", (), {"cross_attention_dim": 384})()})()

    def _see(self, n: int) -> None:
        self.seen.append(n)
        if self.limit is not None and n > self.limit:
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def prepare(self, crops):
        self._see(len(crops))
        return np.broadcast_to(crops.reshape(len(crops), -1).mean(axis=1, dtype=np.float32)[:, None, None, None],
                               (len(crops), 8, 32, 32)).copy()

    def generate(self, latents, windows):
        self._see(len(latents))
        value = (latents[:, 0, 0, 0] + windows[:, 0, 0] * 7).astype(np.uint8)
        return np.broadcast_to(value[:, None, None, None], (len(latents), 256, 256, 3)).copy()

    def encode_pieces(self, pieces):
        return np.repeat(pieces[:, ::320, None, None], 384, axis=3).repeat(5, axis=2)[:, :1500].astype(np.float32)

    def audio_features(self, pcm):  # as the runner's audio_pieces would give (the pipeline's own call)
        from lipsync_runner.audio import windows as audio

        states = self.encode_pieces(audio.pad_pieces(np.asarray(pcm, np.float32)))
        return states.reshape(-1, *states.shape[2:])[: audio.step_count(len(pcm))]




class InFlight:
    """A row-wise model with the runner's combined call, recording how many calls overlap.

    The first call waits (up to 10 s) for a second one to start: with one chunk at a time, none
    starts, and the most seen at once stays 1."""

    weights_id = "tiny"

    def __init__(self) -> None:
        self.model = Sizes()
        self.active = self.most = self.calls = 0
        self.lock = threading.Lock()
        self.second = threading.Event()

    def audio_features(self, pcm):
        return self.model.audio_features(pcm)

    def prepare(self, crops):
        return self.model.prepare(crops)

    def generate(self, latents, windows):
        return self.model.generate(latents, windows)

    def prepare_generate(self, crops, windows):
        with self.lock:
            self.active += 1
            self.calls += 1
            first = self.calls == 1
            self.most = max(self.most, self.active)
        if first:
            self.second.wait(10)
        else:
            self.second.set()
        try:
            return self.model.generate(self.model.prepare(crops), windows)
        finally:
            with self.lock:
                self.active -= 1


def test_chunks_overlap_at_the_model_and_the_output_is_the_one_chunk_at_a_time_path(media_dir, tmp_path, recorded):
    detector = HaarFaceDetector()
    video, audio = media_dir / "face.mp4", media_dir / "speech_short.wav"
    # today's path: one chunk at a time, prepare then generate apart
    run(Sizes(), detector, video, audio, tmp_path / "a.mp4", PipelineOptions(batch_size=4, chunks_in_flight=1))
    sequential = [f.copy() for f in recorded]
    recorded.clear()
    overlapped = InFlight()
    result = run(overlapped, detector, video, audio, tmp_path / "b.mp4", PipelineOptions(batch_size=4,
                                                                                          chunks_in_flight=3))
    assert overlapped.most >= 2, "no two chunks were at the model at once"
    assert overlapped.calls == -(-result.generated // 4) > 2
    assert len(recorded) == len(sequential) == result.frames
    assert len({int(f.sum()) for f in sequential}) > 10  # generated faces differ frame to frame: order shows
    assert all(np.array_equal(a, b) for a, b in zip(recorded, sequential)), "the frames differ from one at a time"


def test_the_service_sends_chunks_in_flight_by_default():
    assert ServiceSettings().chunks_in_flight >= 2


class Wire:
    """A direct runner behind RemoteModel, recording what each call carries."""

    def __init__(self, core: RunnerCore) -> None:
        self.submit_direct = runner_submitter(core, None)
        self.sent: list[tuple[str, np.dtype, int, int]] = []  # endpoint, dtype, rows, pickled bytes

    def submit(self, endpoint: str, rows: np.ndarray):
        buffers: list = []
        head = pickle.dumps(rows, protocol=5, buffer_callback=buffers.append)  # BentoML's PickleSerde
        size = len(head) + sum(b.raw().nbytes for b in buffers)
        self.sent.append((endpoint, rows.dtype, len(rows), size))
        return self.submit_direct(endpoint, rows)


def test_a_job_without_cached_latents_makes_one_round_trip_of_uint8_crops(media_dir, tmp_path):
    wire = Wire(runner_with(Sizes()))
    remote = RemoteModel(wire.submit, chunk_frames=4, tag=7.0)
    result = run(remote, HaarFaceDetector(), media_dir / "face.mp4", media_dir / "speech_short.wav",
                 tmp_path / "out.mp4", PipelineOptions(batch_size=8, chunks_in_flight=2))
    frames = [s for s in wire.sent if s[0] != "audio_pieces"]
    assert {s[0] for s in frames} == {"prepare_generate"}  # no prepare, no generate: one trip per chunk
    assert sum(s[2] for s in frames) == result.generated
    for _, dtype, rows, size in frames:
        assert dtype == np.uint8
        assert RENDER_ROW_BYTES * rows <= size <= RENDER_ROW_BYTES * rows + 1024  # the rows' bytes, and a header


def test_with_the_avatar_cache_a_cold_frame_makes_one_round_trip_and_its_latents_come_back(media_dir, tmp_path,
                                                                                           recorded):
    from lipsync_runner.pipeline.avatar_cache import AvatarCache

    cache = AvatarCache(tmp_path / "avatars")
    video, audio = media_dir / "face.mp4", media_dir / "speech_short.wav"
    options = PipelineOptions(batch_size=8, chunks_in_flight=2)
    cold = Wire(runner_with(Sizes()))
    first = run(RemoteModel(cold.submit, chunk_frames=4), HaarFaceDetector(), video, audio, tmp_path / "a.mp4",
                options, cache=cache)
    cold_frames = [f.copy() for f in recorded]
    recorded.clear()
    assert first.cache_hit is False
    sent = {s[0] for s in cold.sent} - {"audio_pieces"}
    assert "prepare_generate_latents" in sent and "prepare" not in sent  # encode and generate: one trip
    warm = Wire(runner_with(Sizes()))
    second = run(RemoteModel(warm.submit, chunk_frames=4), HaarFaceDetector(), video, audio, tmp_path / "b.mp4",
                 options, cache=cache)
    assert second.cache_hit is True
    assert {s[0] for s in warm.sent} - {"audio_pieces"} == {"generate"}  # the latents came back and were kept
    assert all(np.array_equal(a, b) for a, b in zip(recorded, cold_frames)) and len(recorded) == len(cold_frames)


def test_uint8_rows_carry_the_crop_as_it_is_and_the_window_exactly():
    rng = np.random.default_rng(3)
    crops = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    windows = rng.normal(size=(2, 50, 384)).astype(np.float32)
    packed = pack_render(crops, windows, tag=12345.0)
    assert packed.dtype == np.uint8 and packed.shape == (2, RENDER_ROW_BYTES) and RENDER_ROW_BYTES == 273_416
    # today's two trips moved 196,608 + 109,572 B up and 32,768 + 196,608 B down per frame
    assert packed.nbytes / 2 < pack_generate(np.zeros((1, 8, 32, 32), np.float32), windows[:1]).nbytes + 196_608
    tags, c, w = unpack_render(packed, 384)
    assert (tags == 12345.0).all() and np.array_equal(c, crops) and np.array_equal(w, windows)
    # the runner's combined call is prepare then generate, the latents never leaving it
    model = Sizes()
    core = runner_with(model)
    out = core.prepare_generate(packed)
    assert np.array_equal(out, model.generate(model.prepare(crops), windows))
    assert core.stats.batches["prepare"] == core.stats.batches["generate"] == 1  # counted as both


# ------------------------------------------------------------------ batch buckets


def test_the_model_only_ever_sees_bucket_sizes_and_the_padding_is_dropped():
    rng = np.random.default_rng(5)
    sizes = Sizes()
    core = runner_with(sizes, batch_buckets="4,8,16")
    for n in (1, 3, 4, 5, 9, 20):
        crops = rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)
        windows = rng.integers(0, 50, (n, 50, 384)).astype(np.float32)
        latents = core.prepare(crops)
        assert np.array_equal(latents, Sizes().prepare(crops))
        faces = core.generate(pack_generate(latents, windows))
        assert np.array_equal(faces, Sizes().generate(latents, windows))
        assert np.array_equal(core.prepare_generate(pack_render(crops, windows)), faces)
    assert set(sizes.seen) <= {4, 8, 16} and 16 in sizes.seen  # 20 rows: 16 + 4


def test_buckets_above_what_fits_in_memory_are_left_for_smaller_ones():
    sizes = Sizes(limit=8)
    core = runner_with(sizes, batch_buckets="8,16,32")
    crops = np.random.default_rng(6).integers(0, 256, (20, 256, 256, 3), dtype=np.uint8)
    assert np.array_equal(core.prepare(crops), Sizes().prepare(crops))
    assert sizes.seen[0] == 32 and set(sizes.seen[1:]) == {8}  # out of memory at 32, then 8 at a time


def test_buckets_are_the_gpu_default_and_off_on_the_cpu():
    assert runner_with(Sizes()).buckets == ()  # the CPU caches no plan: no padding

    class OnGpu:
        info = type("Info", (), {"device": "cuda:0"})()

    assert runner_with(OnGpu()).buckets == GPU_BUCKETS == (8, 16, 32, 64)
    assert runner_with(OnGpu(), batch_buckets="off").buckets == ()
    with pytest.raises(ValueError, match="BATCH_BUCKETS"):
        RunnerSettings(batch_buckets="8,big")


# ------------------------------------------------------------------ threads from the cores


def test_cores_are_the_affinity_bounded_by_the_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: set(range(16)))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")
    assert available_cores(v2) == 16
    (v2 / "cpu.max").write_text("250000 100000\n")  # --cpus=2.5
    assert available_cores(v2) == 3
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cores(v1) == 4
    assert available_cores(tmp_path / "none") == 16


def test_job_workers_and_x264_threads_follow_the_cores_and_settings_win(monkeypatch, tmp_path):
    monkeypatch.delenv("LIP_SYNC_JOB_WORKERS", raising=False)
    monkeypatch.delenv("LIP_SYNC_X264_THREADS", raising=False)
    for cores, workers, threads in ((16, 8, 2), (4, 2, 2), (2, 2, 2), (1, 2, 2)):
        monkeypatch.setattr(config, "available_cores", lambda cores=cores: cores)
        assert (ServiceSettings().job_workers, RunnerSettings().x264_threads) == (workers, threads), cores
    monkeypatch.setattr(config, "available_cores", lambda: 12)
    monkeypatch.setenv("LIP_SYNC_JOB_WORKERS", "4")  # fewer jobs: each encoder gets a larger share
    assert ServiceSettings().job_workers == 4 and RunnerSettings().x264_threads == 3
    monkeypatch.setenv("LIP_SYNC_JOB_WORKERS", "1")
    assert RunnerSettings().x264_threads == 4
    monkeypatch.setenv("LIP_SYNC_X264_THREADS", "6")
    assert RunnerSettings().x264_threads == 6

    # the encoder gets them: ffmpeg's arguments carry x264's thread count
    monkeypatch.setattr(config, "available_cores", lambda: 16)
    monkeypatch.delenv("LIP_SYNC_JOB_WORKERS")
    monkeypatch.delenv("LIP_SYNC_X264_THREADS")
    codecs = video_codecs("off")
    assert codecs.threads == 2
    started = []

    class Recorded(Exception):
        pass

    def record(args, **kwargs):
        started.append(args)
        raise Recorded

    monkeypatch.setattr(ffmpeg, "_FfmpegProcess", record)
    with pytest.raises(Recorded):
        ffmpeg.VideoWriter(tmp_path / "out.mp4", 64, 64, 25, codec=codecs.encoder, threads=codecs.threads)
    args = started[0]
    assert args[args.index("-c:v") + 1] == "libx264" and args[args.index("-threads") + 1] == "2"
    assert ffmpeg._video_codec_args("libx264", "veryfast", 18, 3)[-2:] == ["-threads", "3"]


# ------------------------------------------------------------------ the image: NVDEC, a compiler


def test_the_image_exposes_nvdec_and_has_a_compiler():
    bento = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    envs = {e["name"]: e["value"] for e in bento["envs"]}
    assert set(envs["NVIDIA_DRIVER_CAPABILITIES"].split(",")) >= {"compute", "utility", "video"}
    assert envs["LIP_SYNC_FFMPEG"] == "/usr/bin/ffmpeg"  # Debian's, built with NVDEC; not the static one
    assert {"ffmpeg", "gcc", "libc6-dev"} <= set(bento["docker"]["system_packages"])
    runner = next(d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/base/runner.yaml").read_text())
                  if d and d.get("kind") == "Deployment")
    container = runner["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in container["env"]}["NVIDIA_DRIVER_CAPABILITIES"] == \
        "compute,utility,video"


def test_compile_without_a_c_compiler_is_refused_with_the_reason(tmp_path, monkeypatch):
    from lipsync_runner.serving import runner as runner_module

    loads = []
    monkeypatch.setattr(runner_module.MuseTalk, "from_pretrained",
                        classmethod(lambda cls, models_dir, **kw: loads.append(kw) or Sizes()))
    settings = RunnerSettings(device="cpu", compile=True).model_copy(update={"models_dir": tmp_path})
    monkeypatch.setattr(runner_module.shutil, "which", lambda name: None)
    core = RunnerCore(settings, load=False)
    core._load()
    assert core.state == "error" and "needs a C compiler" in core.error and "LIP_SYNC_COMPILE=false" in core.error
    assert core.health()["status"] == "error" and loads == []  # refused before any weight is read

    monkeypatch.setattr(runner_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    core = RunnerCore(settings, load=False)
    core._load()
    assert core.state == "ready" and loads[0]["compile"] is True
    core = RunnerCore(settings.model_copy(update={"compile": False}), load=False)
    monkeypatch.setattr(runner_module.shutil, "which", lambda name: None)
    core._load()
    assert core.state == "ready"  # no compiler needed without compile
