"""The device kit and the GPU check: a missing module is found here, not on the lent GPU machine.

The lent machine reaches no package registry: what the GPU check imports must be in its image
(bench/gpu_steps/lent_machine.txt, copied from the device tool's KINDS.md) or in the kit
(bench/gpu_steps/kit.txt, the wheels bench/device_kit.sh downloads). Two proofs, no network:
- the lists: each step's declared modules and every requirement of every kit wheel resolve to a
  lent package or a kit pin;
- a run: the check's smoke mode (tiny models, CPU) in a virtual environment that holds only the
  lent packages and the kit's packages (this venv's installed copies, linked in), with every module
  each step loaded recorded and compared with what the step declares.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
STEPS_DIR = ROOT / "bench" / "gpu_steps"
STEPS = ("numerics", "core", "pipeline", "service")
LOCAL = {"lipsync_runner", "service", "bench", "tests"}  # the repository's own modules
# The lent machine's CPython, for requirement markers.
LENT_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
# Our name for a package the lent image has under another distribution name.
SAME_PACKAGE = {"opencv-python": "opencv-python-headless"}
# Needed here only: this venv's huggingface-hub 2.x uses httpx2; the lent machine's 1.33 uses httpx.
VERSION_DRIFT = {"httpx2", "httpcore2", "truststore"}


def norm(name: str) -> str:
    name = re.sub(r"[-_.]+", "-", name).lower()
    return SAME_PACKAGE.get(name, name)


def _lines(path: Path) -> list[str]:
    return [x for x in (line.split("#", 1)[0].strip() for line in path.read_text().splitlines()) if x]


def lent() -> set[str]:
    return {norm(x) for x in _lines(STEPS_DIR / "lent_machine.txt")}


def kit_pins() -> dict[str, str]:
    return {norm(x.split("==")[0]): x.split("==")[1] for x in _lines(STEPS_DIR / "kit.txt")}


def step_modules(step: str) -> tuple[str, ...]:
    return importlib.import_module(f"bench.gpu_steps.{step}").MODULES


def distribution_of(module: str) -> set[str]:
    return {norm(d) for d in md.packages_distributions().get(module, [])}


# ---------------------------------------------------------------- the lists


def test_the_lent_machine_lacks_what_the_issue_says_and_the_kit_brings_it():
    have = lent()
    assert {"torch", "transformers", "opencv-python-headless", "httpx", "numpy"} <= have
    missing_there = {"diffusers", "pydantic", "pydantic-settings", "bentoml", "cachetools", "webrtcvad-wheels",
                     "imageio-ffmpeg"}
    assert not missing_there & have
    assert missing_there <= set(kit_pins())
    assert not set(kit_pins()) & have, "a kit wheel the lent machine already has: two versions stop the install"


@pytest.mark.parametrize("step", STEPS)
def test_every_module_a_step_imports_is_on_the_lent_machine_or_in_the_kit(step):
    available = lent() | set(kit_pins())
    for module in step_modules(step):
        if module in LOCAL:
            continue
        dists = distribution_of(module)
        assert dists, f"{step} imports {module}, which no installed distribution provides"
        assert dists & available, f"{step} imports {module} ({', '.join(dists)}): neither lent nor in kit.txt"


def test_every_requirement_of_every_kit_wheel_is_lent_or_in_the_kit():
    available = lent() | set(kit_pins())
    for name, version in kit_pins().items():
        if name == "imageio-ffmpeg":
            continue  # the kit's 0.6.0 requires nothing we lack (its binary is inside the wheel)
        dist = md.distribution(name)
        assert dist.version == version, f"kit.txt pins {name}=={version}, this venv (the tested one) has {dist.version}"
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate(LENT_MARKERS):
                continue
            assert norm(req.name) in available, f"{name} requires {req.name}: add it to kit.txt"


def test_the_kit_holds_nothing_the_steps_do_not_need():
    declared = {d for step in STEPS for m in step_modules(step) for d in distribution_of(m)}
    unneeded = set(kit_pins()) - kit_closure(declared)
    assert not unneeded, f"kit.txt lists {sorted(unneeded)}, which no step imports or requires"


def test_kit_pins_are_the_products_pins():
    pins = {norm(m.group(1)): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s#;]+)",
                                                              (ROOT / "requirements.txt").read_text(), re.M)}
    for name, version in kit_pins().items():
        if name in pins and name != "imageio-ffmpeg":  # the kit's ffmpeg is the one that fits (kit.txt says why)
            assert pins[name] == version, f"kit.txt pins {name}=={version}, requirements.txt {pins[name]}"


def test_the_kit_script_downloads_the_list_for_cpython_312_and_prints_the_run_call():
    script = (ROOT / "bench" / "device_kit.sh").read_text()
    for needle in ("--no-deps", "--only-binary=:all:", "--python-version 3.12", "manylinux", "kit.txt",
                   "MAX_MIB=48", 'run(command="bash bench/gpu_check.sh", carry=["$KIT"]'):
        assert needle in script
    check = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "--no-index --no-deps" in check and "--target" in check
    assert "pip download" not in check and "pip install -q --upgrade" not in check
    assert "/bench/kit/" in (ROOT / ".gitignore").read_text().splitlines()


# ---------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def lent_venv(tmp_path_factory) -> Path:
    """A venv with only the lent packages and the kit's packages: this venv's copies, linked in."""
    root = tmp_path_factory.mktemp("lent-venv")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    python = root / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    allowed = lent() | set(kit_pins()) | VERSION_DRIFT
    linked = set()
    for dist in md.distributions():
        if norm(dist.metadata["Name"]) not in allowed:
            continue
        for f in dist.files or []:
            top = f.parts[0]
            if top in ("..", "__pycache__") or top in linked or top.endswith(".pth") and "editable" in top:
                continue
            target = Path(dist.locate_file(top))
            if target.exists():
                (site / top).symlink_to(target)
                linked.add(top)
    return python


def test_the_smoke_check_runs_on_lent_packages_and_the_kit_alone(lent_venv, tmp_path):
    """The check's own script, smoke mode: preflight, numerics, core, pipeline (the service step's
    imports are checked by the preflight; its `bentoml serve` run takes minutes on this machine)."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))},
           "PYTHON": str(lent_venv), "OUT": str(out), "GPU_CHECK_WORK": str(work), "GPU_CHECK_SMOKE": "1",
           "GPU_CHECK_STEPS": "numerics core pipeline", "GPU_CHECK_TRACE_IMPORTS": "1"}
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 1 <= len(files) <= 6
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_step: dict[str, list[dict]] = {}
    for r in records:
        by_step.setdefault(r["step"], []).append(r)

    preflight = by_step["preflight"][0]
    assert preflight["steps"] == {s: "run" for s in STEPS}, preflight["steps"]  # service's imports too
    assert preflight["libx264"] is True and preflight["nvenc"] is False and preflight["hw_codecs_reason"]

    numerics = {r["variant"]: r for r in by_step["numerics"] if r["reference"] == "cpu_fp32"}
    assert set(numerics) == {"cpu_fp32", "cpu_fp16_channels_last"}
    fast = numerics["cpu_fp16_channels_last"]
    assert fast["all_finite"] and 0 < fast["latents_rel_err"] < 0.05 and 0 < fast["whisper_rel_err"] < 0.05
    assert fast["faces_max_abs_diff"] < 64 and fast["faces_mean_abs_diff"] < 4

    core = [r for r in by_step["core"] if "ms" in r]
    assert {(r["net"], r["layout"]) for r in core} == {(n, lay) for n in ("unet", "vae_decode", "vae_encode_x2")
                                                      for lay in ("channels_last", "nchw")}
    assert not [r for r in by_step["core"] if "error" in r]

    pipeline = by_step["pipeline"][0]
    assert pipeline["cold"]["frames"] == pipeline["warm"]["frames"] > 0
    assert not pipeline["cold"]["cache_hit"] and pipeline["warm"]["cache_hit"]
    assert pipeline["detector"] == "haar", "the lent machine has no mediapipe: the check must not assume it"

    # Every kit package a step loaded is one it declares or one of their requirements: the
    # preflight, which imports the declared modules, loads all of them too.
    kit_modules = {m: norm(d) for m, ds in md.packages_distributions().items() for d in ds if norm(d) in kit_pins()}
    for step in ("numerics", "core", "pipeline"):
        loaded = {kit_modules[m] for m in (work / f"imports-{step}.txt").read_text().split() if m in kit_modules}
        covered = kit_closure({d for m in step_modules(step) for d in distribution_of(m)})
        assert loaded <= covered, f"{step} loaded {sorted(loaded - covered)} from the kit without declaring it"


def kit_closure(dists: set[str]) -> set[str]:
    """The kit distributions among `dists` and everything they require, transitively."""
    kit, seen, todo = kit_pins(), set(), [d for d in dists if d in kit_pins()]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in md.distribution(name).requires or []:
            req = Requirement(text)
            if (not req.marker or req.marker.evaluate(LENT_MARKERS)) and norm(req.name) in kit:
                todo.append(norm(req.name))
    return seen
