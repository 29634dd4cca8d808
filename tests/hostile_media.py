"""Builders of media files that lie about themselves, for the hostile-input tests.

Each starts from a real file made with ffmpeg and edits bytes the way an uploader could:
MP4 sample tables, WAV headers, Matroska metadata, text playlists. Nothing here trusts
ffmpeg to produce the lie; the edits are done in Python on the container's structures.
"""

from __future__ import annotations

import struct
import subprocess
import zlib
from pathlib import Path

from lipsync_runner.media.ffmpeg import ffmpeg_exe

_CONTAINER_BOXES = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"}


def ffmpeg(*args: str | Path) -> None:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y", *map(str, args)],
                   check=True, capture_output=True, timeout=120)


# --------------------------------------------------------------------------- MP4 / MOV


def _boxes(buf: bytearray, start: int, end: int):
    """(type, box start, payload start, box end) of the boxes in buf[start:end]."""
    i = start
    while i + 8 <= end:
        size, kind = struct.unpack_from(">I4s", buf, i)
        header = 8
        if size == 1:
            size, header = struct.unpack_from(">Q", buf, i + 8)[0], 16
        elif size == 0:
            size = end - i
        if size < header:
            raise ValueError(f"corrupt box {kind!r} at {i}")
        yield kind, i, i + header, i + size
        i += size


def _find(buf: bytearray, start: int, end: int, kind: bytes):
    return [(s, b, e) for k, s, b, e in _boxes(buf, start, end) if k == kind]


def _set_duration(buf: bytearray, payload: int, kind: bytes, scale: float) -> None:
    """Scale the duration field of an mvhd, tkhd or mdhd box (version 0 or 1)."""
    version = buf[payload]
    if kind == b"tkhd":
        offset, width = (payload + 4 + 16 + 8, 8) if version else (payload + 4 + 8 + 8, 4)
    else:  # mvhd, mdhd: created, modified, timescale, duration
        offset, width = (payload + 4 + 16 + 4, 8) if version else (payload + 4 + 8 + 4, 4)
    fmt = ">Q" if width == 8 else ">I"
    old = struct.unpack_from(fmt, buf, offset)[0]
    struct.pack_into(fmt, buf, offset, min(int(old * scale), 2 ** (8 * width) - 1))


def mp4_with_sample_durations(src: Path, dst: Path, *, delta: int | None = None, factor: int | None = None) -> Path:
    """Copy an MP4/MOV/M4A with every `stts` sample duration set to `delta` (or multiplied by
    `factor`), and the track, media and movie durations in the headers edited to agree.

    The samples themselves are untouched: an AAC track still decodes to 1024 samples per
    packet and a video track to one picture per sample, whatever the timestamps now say.
    Build the source with ``-use_editlist 0`` (an edit list would cut the presentation).
    """
    buf = bytearray(src.read_bytes())
    (moov_start, moov_body, moov_end), = _find(buf, 0, len(buf), b"moov")
    ratios = []
    for _, trak_body, trak_end in _find(buf, moov_body, moov_end, b"trak"):
        (_, mdia_body, mdia_end), = _find(buf, trak_body, trak_end, b"mdia")
        (_, minf_body, minf_end), = _find(buf, mdia_body, mdia_end, b"minf")
        (_, stbl_body, stbl_end), = _find(buf, minf_body, minf_end, b"stbl")
        (_, stts, _), = _find(buf, stbl_body, stbl_end, b"stts")
        entries = struct.unpack_from(">I", buf, stts + 4)[0]
        old_total = new_total = 0
        for k in range(entries):
            offset = stts + 8 + 8 * k
            count, old = struct.unpack_from(">II", buf, offset)
            new = delta if delta is not None else old * (factor or 1)
            struct.pack_into(">I", buf, offset + 4, new)
            old_total += count * old
            new_total += count * new
        ratio = new_total / old_total if old_total else 1.0
        ratios.append(ratio)
        (_, mdhd, _), = _find(buf, mdia_body, mdia_end, b"mdhd")
        _set_duration(buf, mdhd, b"mdhd", ratio)
        (_, tkhd, _), = _find(buf, trak_body, trak_end, b"tkhd")
        _set_duration(buf, tkhd, b"tkhd", ratio)
    (_, mvhd, _), = _find(buf, moov_body, moov_end, b"mvhd")
    _set_duration(buf, mvhd, b"mvhd", max(ratios))
    dst.write_bytes(bytes(buf))
    return dst


# --------------------------------------------------------------------------- WAV


def wav_with_header(src: Path, dst: Path, *, data_size: int | None = None, sample_rate: int | None = None) -> Path:
    """Copy a PCM WAV with its `data` chunk size and/or its sample rate (and byte rate) rewritten."""
    buf = bytearray(src.read_bytes())
    assert buf[:4] == b"RIFF" and buf[8:12] == b"WAVE", "not a RIFF/WAVE file"
    i = 12
    while i + 8 <= len(buf):
        kind, size = buf[i:i + 4], struct.unpack_from("<I", buf, i + 4)[0]
        if kind == b"fmt " and sample_rate is not None:
            channels, bits = struct.unpack_from("<H", buf, i + 10)[0], struct.unpack_from("<H", buf, i + 22)[0]
            struct.pack_into("<I", buf, i + 12, sample_rate)
            struct.pack_into("<I", buf, i + 16, sample_rate * channels * bits // 8)
        if kind == b"data":
            if data_size is not None:
                struct.pack_into("<I", buf, i + 4, data_size)
            break
        i += 8 + size + (size & 1)
    dst.write_bytes(bytes(buf))
    return dst


# --------------------------------------------------------------------------- metadata


def mkv_with_huge_metadata(src: Path, dst: Path, *, lines: int) -> Path:
    """Copy a video into Matroska with one title tag of `lines` lines: a few bytes each in the
    file, about 22 bytes each every time ffmpeg prints the input summary."""
    meta = dst.with_suffix(".ffmetadata")
    meta.write_text(";FFMETADATA1\ntitle=x" + "\\\n" * lines + "y\n")
    try:
        ffmpeg("-i", src, "-i", meta, "-map", "0", "-map_metadata", "1", "-c", "copy", dst)
    finally:
        meta.unlink()
    return dst


# --------------------------------------------------------------------------- frame size and timestamps


def flat_png(dst: Path, width: int, height: int, grey: int) -> Path:
    """A flat grey PNG of any size, a few hundred KB at 16000x16000, built in well under a second and
    without the picture in memory: the deflate stream of a block of rows, ended with a full flush, is
    the same whenever that block is compressed again, so it is compressed once and repeated."""
    row = b"\x00" + bytes([grey]) * width  # filter type 0, then the samples
    rows = next(n for n in (1000, 100, 10, 1) if height % n == 0)
    block = row * rows
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate; the zlib wrapper is written below
    body = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(height // rows):
        adler = zlib.adler32(block, adler)
    idat = b"\x78\xda" + body * (height // rows) + deflate.flush() + struct.pack(">I", adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    dst.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return dst


def mkv_of_huge_frames(dst: Path, width: int, height: int, *, frames: int = 2, audio_seconds: float = 2.0) -> Path:
    """A Matroska file of `frames` flat `width` x `height` pictures (PNG, 1 fps, copied as they are)
    with `audio_seconds` of AAC: two 16000x16000 frames make about 0.6 MB. (ffmpeg decodes a
    picture once to mux it: a few seconds and 300 MB at that size.)"""
    for i in range(frames):
        flat_png(dst.with_name(f"{dst.stem}-{i + 1}.png"), width, height, 100 + 20 * i)
    try:
        ffmpeg("-framerate", "1", "-i", dst.with_name(f"{dst.stem}-%d.png"),
               "-f", "lavfi", "-i", f"sine=frequency=440:duration={audio_seconds}",
               "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", dst)
    finally:
        for i in range(frames):
            dst.with_name(f"{dst.stem}-{i + 1}.png").unlink(missing_ok=True)
    return dst


def vfr_with_a_gap(src: Path, dst: Path, *, gap_s: float, frames: int = 2) -> Path:
    """The first `frames` frames of `src` re-encoded into Matroska with `gap_s` seconds between
    consecutive timestamps (a variable-rate file: ffmpeg still reads it as `src`'s frame rate)."""
    ffmpeg("-i", src, "-frames:v", str(frames), "-vf", f"setpts=N*{gap_s}/TB", "-fps_mode", "vfr",
           "-c:v", "libx264", "-preset", "ultrafast", "-an", dst)
    return dst


# --------------------------------------------------------------------------- playlists


def ffconcat(dst: Path, target: Path, *, repeat: int) -> Path:
    """An ffconcat playlist that plays `target` (a sibling file) `repeat` times."""
    dst.write_text("ffconcat version 1.0\n" + f"file '{target.name}'\n" * repeat)
    return dst


def hls_playlist(dst: Path, segment: Path, *, repeat: int, seconds: float = 10.0) -> Path:
    """An HLS (m3u8) playlist whose segments are all `segment` (a sibling file)."""
    body = "".join(f"#EXTINF:{seconds:.1f},\n{segment.name}\n" for _ in range(repeat))
    dst.write_text(f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:{int(seconds)}\n{body}#EXT-X-ENDLIST\n")
    return dst
