"""The README's examples run as pasted (issue 15), so the README cannot drift from the service.

The same holds for the pages in `docs/` that the README links to (issue 20: the README is short,
the reference moved to `docs/`): a runnable block runs wherever it lives.

Convention, in README.md and in every `docs/*.md` page:

* `<!-- readme-test: run -->` on the line before a fenced ```bash or ```python block: this test runs it.
* `<!-- readme-test: skip REASON -->` there: it does not (it starts the server, needs Docker, the
  internet, real weights...).
* In the README's service section (`## The service`) and in the pages that hold the API's examples
  (`MARKED_PAGES`), every bash and python block carries one of the two, so a new example cannot
  slip in unrun.
* The README stays a five-minute read (at most `README_MAX_LINES` lines), shows one curl and one SDK
  example that run, and links every page in `docs/`; every relative link of the README and of
  those pages leads to a file (and heading) that exists.

How they run: against a real server (`bentoml serve`, tiny random-weight models, no tokens), from a
temporary directory laid out like the checkout after `./scripts/demo.sh`: `demo/face.mp4` and
`demo/speech.wav` (the demo's names; shorter clips than `make-test-assets` writes, so the jobs are
quick) and `.venv`. The one edit made to the blocks: `http://localhost:3000` becomes the test
server's address. The bash blocks run in order (the README's first, then the docs pages' in
name order) in one bash process, as if pasted into one terminal
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

from lipsync_runner.media.ffmpeg import probe_audio, probe_video

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SERVICE_SECTION = "The service"
# docs pages whose every bash and python block is marked run or skip (the API's examples live there)
MARKED_PAGES = ("docs/api.md", "docs/integration.md", "docs/operations.md", "docs/architecture.md")
# every page the README must link (configuration.md is generated from lipsync_runner/config.py)
DOCS_PAGES = ("docs/api.md", "docs/operations.md", "docs/architecture.md", "docs/integration.md",
              "docs/configuration.md", "docs/benchmarks.md", "docs/reliability.md", "docs/look.md")
README_MAX_LINES = 250
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
    page: str = "README.md"  # relative to the repository root

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def readme_blocks(text: str, page: str = "README.md") -> list[Block]:
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
                            skip.group(1) if skip else "", page))
        previous, i = "", end + 1
    return blocks


def pages() -> list[Path]:
    """The README first, then every docs page in name order: where runnable blocks may live."""
    return [README, *sorted(DOCS.glob("*.md"))]


def all_blocks() -> list[Block]:
    return [b for path in pages() for b in readme_blocks(path.read_text(), path.relative_to(ROOT).as_posix())]


def runnable(lang: str) -> list[Block]:
    return [b for b in all_blocks() if b.mark == "run" and b.lang == lang]


def governed(block: Block) -> bool:
    """Blocks that must be marked: the README's service section and the marked pages, whole."""
    if block.page == "README.md":
        return block.section == SERVICE_SECTION
    return block.page in MARKED_PAGES


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


def test_every_example_of_the_service_section_and_the_api_pages_is_run_or_says_why_not():
    for page in MARKED_PAGES:
        assert (ROOT / page).is_file(), f"{page} is missing"
    blocks = [b for b in all_blocks() if governed(b) and b.lang in LANGS]
    unmarked = [b.where for b in blocks if b.mark is None]
    assert not unmarked, f"mark these blocks `{RUN}` or `<!-- readme-test: skip REASON -->`: {unmarked}"
    readme_run = [b for b in blocks if b.page == "README.md" and b.mark == "run"]
    assert {b.lang for b in readme_run} == set(LANGS), "the README's service section shows a curl and an SDK example"
    # every example that talks to the service uses the one address the test replaces, and the demo's files
    for b in runnable("bash") + runnable("python"):
        assert README_URL in b.code, f"{b.where} does not use {README_URL}"
        assert "demo/face.mp4" in b.code or "generate" not in b.code, f"{b.where}: use the demo's files"
        assert "<job_id>" not in b.code, f"{b.where}: a placeholder cannot be pasted"


# ------------------------------------------------------------------ a short README that links the rest

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings (lower case, punctuation dropped, spaces to hyphens)."""
    anchors: set[str] = set()
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line) or line.strip() == "```":
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_heading_anchors_follow_github():
    text = ("## Dubbing controls: sync modes, silence, segments\n```bash\n# not a heading\n```\n"
            "### Python client and `lipsync` command\n")
    assert heading_anchors(text) == {"dubbing-controls-sync-modes-silence-segments",
                                     "python-client-and-lipsync-command"}


def test_the_readme_is_a_five_minute_read_that_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, f"README.md has {len(text.splitlines())} lines"
    for quick_start in ("./scripts/demo.sh", "./scripts/setup.sh dev && .venv/bin/python -m pytest -q -n 2"):
        assert quick_start in text, f"the quick start's command `{quick_start}` is gone"
    linked = {target.split("#")[0] for target in LINK.findall(text)}
    present = {p.relative_to(ROOT).as_posix() for p in DOCS.glob("*.md")}
    missing = sorted((set(DOCS_PAGES) | present) - linked)
    assert not missing, f"README.md does not link {missing}"


def test_the_links_of_the_readme_and_the_docs_pages_lead_somewhere():
    broken = []
    for page in [README, *(ROOT / p for p in MARKED_PAGES)]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)} -> {target}"
            if not file.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file.read_text()):
                broken.append(f"{where} (no such heading)")
    assert not broken, broken


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
        where = ", ".join(b.where for b in self.blocks)
        try:
            code = self.proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        output = f"--- stdout\n{self.out.read_text()[-4000:]}\n--- stderr\n{self.err.read_text()[-4000:]}"
        assert code == 0, f"the blocks at {where} failed (exit {code}):\n{output}"
        return self.out.read_text()


def start(blocks: list[Block], command: list[str], script: str, cwd: Path, env: dict, logs: Path) -> Run:
    name = f"{blocks[0].page.replace('/', '-')}-line-{blocks[0].line}"
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
    # what ran before the README was split: REST, wait=true and Idempotency-Key in the shell; BentoML and the SDK
    assert len(bash) >= 3 and len(python) >= 2, [b.where for b in bash + python]
    logs = tmp_path / "logs"
    logs.mkdir()
    # The shell blocks in order in one shell; each Python block in its own interpreter, alongside
    # (they share nothing, and the overlap keeps this test short).
    script = BASH_PRELUDE + "".join(f"echo '>>> {b.where}'\n{localize(b.code)}\n" for b in bash)
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
