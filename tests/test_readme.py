"""The README's examples run as pasted (issue 15), so the README cannot drift from the service.

Convention, in README.md:

* `<!-- readme-test: run -->` on the line before a fenced ```bash or ```python block: this test runs it.
* `<!-- readme-test: skip REASON -->` there: it does not (it starts the server, needs Docker, the
  internet, real weights...).
* In the service section (`## The service`) every bash and python block carries one of the two, so
  a new example cannot slip in unrun.

How they run: against a real server (`bentoml serve`, tiny random-weight models, no tokens), from a
temporary directory laid out like the checkout after `./scripts/demo.sh`: `demo/face.mp4` and
`demo/speech.wav` (the demo's names; shorter clips than `make-test-assets` writes, so the jobs are
quick) and `.venv`. The one edit made to the blocks: `http://localhost:3000` becomes the test
server's address. The bash blocks run in order in one bash process, as if pasted into one terminal
(so `$JOB` set in one block is there in the next), with `set -euo pipefail` and a `curl` that fails
on an HTTP error status. Each python block runs in its own `.venv/bin/python`, the checkout
importable as from the repository root, alongside the shell (they share nothing). Every MP4 the
examples write must be a playable video of the demo's length.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from lipsync_runner.media import probe_audio, probe_video

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SERVICE_SECTION = "The service"
LANGS = ("bash", "python")
README_URL = "http://localhost:3000"
RUN = "<!-- readme-test: run -->"
SKIP = re.compile(r"^<!-- readme-test: skip (\S.*?) -->$")
FENCE = re.compile(r"^```(\w*)\s*$")
TIMEOUT_S = 600  # per process; generous: the jobs share two loaded CPU cores

BASH_PRELUDE = """\
set -euo pipefail
curl() { command curl --fail-with-body --silent --show-error "$@"; }  # an HTTP error status fails the block
"""


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    section: str  # the `## ` heading above it
    mark: str | None  # "run", "skip" or None
    reason: str = ""


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block with its language, section and mark (the line before the fence)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    section, previous, i = "", "", 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            if lines[i].startswith("## "):
                section = lines[i][3:].strip()
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        skip = SKIP.match(previous)
        mark = "run" if previous == RUN else "skip" if skip else None
        blocks.append(Block(fence.group(1), "\n".join(lines[i + 1:end]) + "\n", i + 1, section, mark,
                            skip.group(1) if skip else ""))
        previous, i = "", end + 1
    return blocks


def runnable(lang: str) -> list[Block]:
    return [b for b in readme_blocks(README.read_text()) if b.mark == "run" and b.lang == lang]


# ------------------------------------------------------------------ the convention


def test_marks_are_read_from_the_line_before_each_block():
    text = ("## The service\n\n<!-- readme-test: run -->\n```bash\necho one\n```\n\n"
            "<!-- readme-test: skip starts the server -->\n```bash\n./scripts/serve.sh\n```\n"
            "```python\n# a heading-like comment\nprint(2)\n```\n\n## Other\n```\nplain\n```\n")
    blocks = readme_blocks(text)
    assert [(b.lang, b.section, b.mark, b.reason) for b in blocks] == [
        ("bash", "The service", "run", ""), ("bash", "The service", "skip", "starts the server"),
        ("python", "The service", None, ""), ("", "Other", None, "")]
    assert blocks[0].code == "echo one\n" and blocks[0].line == 4
    assert blocks[2].code == "# a heading-like comment\nprint(2)\n"


def test_every_example_of_the_service_section_is_run_or_says_why_not():
    blocks = [b for b in readme_blocks(README.read_text()) if b.section == SERVICE_SECTION and b.lang in LANGS]
    unmarked = [f"README.md:{b.line}" for b in blocks if b.mark is None]
    assert not unmarked, f"mark these blocks `{RUN}` or `<!-- readme-test: skip REASON -->`: {unmarked}"
    run = [b for b in blocks if b.mark == "run"]
    assert {b.lang for b in run} == set(LANGS), "the service section shows both shell and Python examples"
    # every example that talks to the service uses the one address the test replaces, and the demo's files
    for b in run:
        assert README_URL in b.code, f"README.md:{b.line} does not use {README_URL}"
        assert "demo/face.mp4" in b.code or "generate" not in b.code, f"README.md:{b.line}: use the demo's files"
        assert "<job_id>" not in b.code, f"README.md:{b.line}: a placeholder cannot be pasted"


# ------------------------------------------------------------------ running them


def demo_checkout(root: Path, media_dir: Path) -> Path:
    """A directory like the repository root after ./scripts/demo.sh (the demo's file names)."""
    (root / "demo").mkdir(parents=True)
    shutil.copy(media_dir / "face.mp4", root / "demo" / "face.mp4")
    shutil.copy(media_dir / "speech_short.wav", root / "demo" / "speech.wav")
    (root / ".venv").symlink_to(ROOT / ".venv")
    return root


@dataclass
class Run:
    """Blocks started as one process; output goes to files (the runs overlap, so no pipe may fill up)."""

    blocks: list[Block]
    proc: subprocess.Popen
    out: Path
    err: Path

    def finish(self) -> str:
        where = ", ".join(f"README.md:{b.line}" for b in self.blocks)
        try:
            code = self.proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        output = f"--- stdout\n{self.out.read_text()[-4000:]}\n--- stderr\n{self.err.read_text()[-4000:]}"
        assert code == 0, f"the README's blocks at {where} failed (exit {code}):\n{output}"
        return self.out.read_text()


def start(blocks: list[Block], command: list[str], script: str, cwd: Path, env: dict, logs: Path) -> Run:
    name = f"line-{blocks[0].line}"
    (logs / f"{name}.in").write_text(script)
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    with (logs / f"{name}.in").open() as stdin, out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(command, stdin=stdin, stdout=o, stderr=e, cwd=cwd, env=env)
    return Run(blocks, proc, out, err)


def test_the_readme_examples_run_as_pasted(open_server, media_dir, tmp_path):
    if shutil.which("jq") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("the README's examples need jq (apt-get install jq)")
        pytest.skip("jq is not installed (the README's shell examples use it)")
    work = demo_checkout(tmp_path / "checkout", media_dir)
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("LIPSYNC_SERVER", None)
    env.pop("LIPSYNC_TOKEN", None)

    def localize(code: str) -> str:
        return code.replace(README_URL, open_server.url)

    bash, python = runnable("bash"), runnable("python")
    assert bash and python
    logs = tmp_path / "logs"
    logs.mkdir()
    # The shell blocks in order in one shell; each Python block in its own interpreter, alongside
    # (they share nothing, and the overlap keeps this test short).
    script = BASH_PRELUDE + "".join(f"echo '>>> README.md:{b.line}'\n{localize(b.code)}\n" for b in bash)
    runs = [start(bash, ["bash", "-s"], script, work, env, logs)]
    runs += [start([b], [str(ROOT / ".venv" / "bin" / "python"), "-"], localize(b.code), work, env, logs)
             for b in python]
    try:
        outputs = [run.finish() for run in runs]
    finally:
        for run in runs:  # one failed: leave nothing running
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
    job_id = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.search(job_id, outputs[0]), outputs[0]  # `echo "$JOB"` printed a real job id

    written = sorted(p for p in (work / "demo").rglob("*.mp4") if p.name != "face.mp4")
    written += sorted(work.glob("*.mp4"))
    assert len(written) >= 3, f"the REST, BentoML and SDK examples each save a result: {written}"
    for path in written:
        info = probe_video(path)
        assert (info.width, info.height) == (320, 240), path
        assert abs(info.duration - 1.2) <= 0.1, (path, info.duration)
        assert probe_audio(path).codec == "aac", path
