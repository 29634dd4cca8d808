"""Inputs by URL: a loopback file server, the SSRF guard for every refused address class, limits.

The guard is tested where it matters, on real connections: a refused URL must not reach the
server at all (its request log stays empty), a redirect to a refused address must not be
followed, and an allowed name must be connected to at the address our resolver vetted.
"""

from __future__ import annotations

import hashlib
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from lipsync_runner.inputs.files import media_specs
from lipsync_runner.errors import InputTooLargeError, InvalidInputError
from lipsync_runner.config import FetchSettings
from lipsync_runner.inputs.fetch import fetch_input
from lipsync_runner.inputs.netguard import (
    AddressPolicy,
    URLRefusedError,
    default_policy,
    forbidden_class,
    guarded_client,
    parse_allowlist,
    system_resolver,
)
from tests.loopback_http import LoopbackServer, Reply

VIDEO_BYTES = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40  # content is checked later, by the worker
SPECS = media_specs(max_video_bytes=64 * 1024, max_audio_bytes=16 * 1024)

# One representative of every class the guard refuses (IPv4 and IPv6 where both exist).
REFUSED = {
    "127.0.0.1": "loopback", "127.8.9.10": "loopback", "::1": "loopback",
    "10.1.2.3": "private", "172.16.5.4": "private", "192.168.0.10": "private", "fd12:3456::1": "private",
    "169.254.10.20": "link-local", "fe80::1": "link-local",
    "100.64.0.7": "CGNAT", "100.127.255.254": "CGNAT",
    "224.0.0.251": "multicast", "ff02::1": "multicast",
    "0.0.0.0": "unspecified", "::": "unspecified",
    "169.254.169.254": "metadata", "fd00:ec2::254": "metadata",
    "::ffff:10.0.0.1": "private",  # IPv4-mapped: what it reaches is 10.0.0.1
    "64:ff9b::a9fe:a9fe": "metadata",  # NAT64 form of 169.254.169.254
    "192.0.2.1": "reserved", "240.0.0.1": "reserved",
}


class FakeDNS:
    """Our resolver hook: names -> addresses, with a log of what was asked. Never reaches real DNS."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host == "localhost":
            return system_resolver(host, port)
        if host not in self.table:
            raise OSError("no such name")
        return self.table[host]


@pytest.fixture
def server():
    with LoopbackServer() as srv:
        srv.routes["/face.mp4"] = lambda req: Reply(200, {"Content-Type": "video/mp4"}, VIDEO_BYTES)
        yield srv


def settings(**kw) -> FetchSettings:
    base = dict(url_connect_timeout_s=2, url_read_timeout_s=2, url_max_redirects=3, url_max_fetch_s=10)
    return FetchSettings(**{**base, **kw})


def fetch(url: str, dest: Path, policy: AddressPolicy, kind: str = "video", **kw):
    return fetch_input(url, dest, SPECS[kind], settings=settings(**kw), policy=policy)


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir())


def test_allowlisted_loopback_server_is_fetched_to_the_job_dir(server, tmp_path):
    got = fetch(server.url("/face.mp4"), tmp_path, AddressPolicy(allowlist=parse_allowlist("127.0.0.1")))
    assert got.file_name == "input_video.mp4" and got.display_name == "face.mp4"
    assert (tmp_path / "input_video.mp4").read_bytes() == VIDEO_BYTES
    assert got.size == len(VIDEO_BYTES) and got.sha256 == hashlib.sha256(VIDEO_BYTES).hexdigest()
    assert leftovers(tmp_path) == ["input_video.mp4"]  # no temporary file left


def test_without_the_allowlist_loopback_is_refused_before_any_request(server, tmp_path):
    with pytest.raises(URLRefusedError, match="loopback"):
        fetch(server.url("/face.mp4"), tmp_path, AddressPolicy())
    assert server.paths() == [] and leftovers(tmp_path) == []


UNREACHABLE = "refused: it cannot be reached from this service"


def test_a_name_that_resolves_to_loopback_is_refused(server, tmp_path):
    """`localhost` through the system resolver (/etc/hosts), and a public-looking name our hook maps to 127.0.0.1."""
    dns = FakeDNS({"cdn.example.com": ["127.0.0.1"]})
    for host in ("localhost", "cdn.example.com"):
        with pytest.raises(URLRefusedError, match=f"^{host} {UNREACHABLE}$"):
            fetch(server.url("/face.mp4", host=host), tmp_path, AddressPolicy(resolver=dns))
    assert dns.asked == ["localhost", "cdn.example.com"]
    assert server.paths() == []


def test_a_forbidden_name_and_a_name_that_does_not_resolve_get_the_same_answer(tmp_path, caplog):
    """Two answers would let a caller probe internal DNS; the server's log keeps the reason, one line each."""
    def slow(host: str, port: int) -> list[str]:
        time.sleep(1)
        return ["93.184.216.34"]

    messages = {}
    for host, resolver in (("db.internal", FakeDNS({"db.internal": ["10.0.0.5"]})), ("nosuch.internal", FakeDNS({})),
                           ("empty.internal", FakeDNS({"empty.internal": []})), ("slow.internal", slow)):
        with caplog.at_level("INFO", logger="lipsync_runner.inputs.netguard"), pytest.raises(URLRefusedError) as e:
            fetch(f"http://{host}/a.mp4", tmp_path, AddressPolicy(resolver=resolver, resolve_timeout_s=0.2))
        messages[host] = e.value.message.replace(host, "<host>")
    assert set(messages.values()) == {f"<host> {UNREACHABLE}"}
    logged = [r.getMessage() for r in caplog.records if r.name == "lipsync_runner.inputs.netguard"]
    assert len(logged) == 4
    assert "10.0.0.5, a private address" in logged[0] and "does not resolve" in logged[1]
    assert "no address" in logged[2] and "did not resolve within 0.2 s" in logged[3]


@pytest.mark.parametrize("address,klass", sorted(REFUSED.items()))
def test_every_forbidden_address_class_is_refused_by_name_and_as_literal(address, klass, tmp_path, caplog):
    assert forbidden_class(address) == klass
    dns = FakeDNS({"files.example.com": [address]})
    with caplog.at_level("INFO", logger="lipsync_runner.inputs.netguard"), \
            pytest.raises(URLRefusedError, match=f"files.example.com {UNREACHABLE}"):
        fetch("http://files.example.com/a.mp4", tmp_path, AddressPolicy(resolver=dns))
    assert f"a {klass} address" in caplog.text  # the class only in the server's log
    literal = f"[{address}]" if ":" in address else address
    with pytest.raises(URLRefusedError, match=klass):
        fetch(f"http://{literal}/a.mp4", tmp_path, AddressPolicy(resolver=dns))
    assert dns.asked == ["files.example.com"]  # the literal is judged without DNS


def test_one_bad_address_among_good_ones_refuses_the_name(tmp_path, caplog):
    dns = FakeDNS({"mixed.example.com": ["93.184.216.34", "10.0.0.8"]})
    with caplog.at_level("INFO", logger="lipsync_runner.inputs.netguard"), \
            pytest.raises(URLRefusedError, match=UNREACHABLE):
        fetch("https://mixed.example.com/a.mp4", tmp_path, AddressPolicy(resolver=dns))
    assert "10.0.0.8, a private address" in caplog.text


def test_public_addresses_are_not_refused():
    for address in ("93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "100.128.0.1"):
        assert forbidden_class(address) is None


def test_redirects_are_checked_on_every_hop(server, tmp_path):
    """The first host is allow-listed; where it redirects to is judged again (and never contacted)."""
    dns = FakeDNS({"files.test": ["127.0.0.1"], "rebind.test": ["127.0.0.1"], "meta.test": ["169.254.169.254"]})
    policy = AddressPolicy(allowlist=parse_allowlist("files.test"), resolver=dns)
    targets = {"/to-literal": server.url("/face.mp4"),  # 127.0.0.1, not allow-listed by that name
               "/to-name": server.url("/face.mp4", host="rebind.test"),
               "/to-metadata": "http://meta.test/latest/meta-data/",
               "/to-ok": server.url("/face.mp4", host="files.test")}
    for path, target in targets.items():
        server.routes[path] = lambda req, target=target: Reply(302, {"Location": target})
    for path, host in (("/to-literal", "127.0.0.1"), ("/to-name", "rebind.test"), ("/to-metadata", "meta.test")):
        with pytest.raises(URLRefusedError, match=f"^{host} {UNREACHABLE}$"):
            fetch(server.url(path, host="files.test"), tmp_path, policy)
    assert server.paths() == ["/to-literal", "/to-name", "/to-metadata"]  # no redirect target was requested
    got = fetch(server.url("/to-ok", host="files.test"), tmp_path, policy)
    assert got.size == len(VIDEO_BYTES) and server.paths()[-2:] == ["/to-ok", "/face.mp4"]
    assert leftovers(tmp_path) == ["input_video.mp4"]


def test_the_connection_goes_to_the_vetted_address_without_a_second_lookup(server, tmp_path):
    """`pinned.test` exists only in our resolver: had anything resolved it again, the fetch would fail."""
    dns = FakeDNS({"pinned.test": ["127.0.0.1"]})
    got = fetch(server.url("/face.mp4", host="pinned.test"), tmp_path,
                AddressPolicy(allowlist=parse_allowlist("pinned.test"), resolver=dns))
    assert got.size == len(VIDEO_BYTES)
    assert dns.asked == ["pinned.test"]
    assert server.requests[0].headers["host"] == f"pinned.test:{server.port}"  # virtual hosting still works


def test_tls_is_verified_against_the_urls_host_not_the_vetted_address(tmp_path):
    """Connecting to the vetted IP must not weaken TLS: the certificate is checked against the URL's name."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=files.test", "-addext", "subjectAltName=DNS:files.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    trust = ssl.create_default_context(cafile=str(cert))
    dns = FakeDNS({"files.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    policy = AddressPolicy(allowlist=parse_allowlist("files.test,other.test"), resolver=dns)
    with LoopbackServer(tls=server_tls) as srv, guarded_client(policy, timeout=httpx.Timeout(5),
                                                                ssl_context=trust) as client:
        srv.routes["/face.mp4"] = lambda req: Reply(200, {}, VIDEO_BYTES)
        assert client.get(srv.url("/face.mp4", host="files.test")).content == VIDEO_BYTES
        with pytest.raises(httpx.ConnectError, match="(?i)hostname|certificate"):
            client.get(srv.url("/face.mp4", host="other.test"))  # same address, wrong name for the certificate


def test_redirect_limit(server, tmp_path):
    server.routes["/loop"] = lambda req: Reply(302, {"Location": "/loop"})
    with pytest.raises(InvalidInputError, match="more than 3 redirects"):
        fetch(server.url("/loop"), tmp_path, AddressPolicy(allowlist=parse_allowlist("127.0.0.1")))
    assert len(server.paths()) == 4


def test_size_limit_counts_real_bytes_of_a_body_without_length(server, tmp_path):
    """Chunked, no Content-Length: stopped just past the limit, nothing kept; at the limit exactly it passes."""
    limit = SPECS["video"].max_bytes

    def endless(req):
        def chunks():
            while True:  # only the client stopping ends this (else the 10 s time bound would, another error)
                yield b"\x00" * 8192
        return Reply(200, {"Content-Type": "video/mp4"}, chunks())

    server.routes["/big.mp4"] = endless
    server.routes["/exact.mp4"] = lambda req: Reply(200, {}, iter([b"\x01" * (limit // 2)] * 2))
    policy = AddressPolicy(allowlist=parse_allowlist("127.0.0.1"))
    with pytest.raises(InputTooLargeError, match="larger than the limit of 64 KB"):
        fetch(server.url("/big.mp4"), tmp_path, policy)
    assert leftovers(tmp_path) == []
    assert fetch(server.url("/exact.mp4"), tmp_path, policy).size == limit


def test_a_declared_length_over_the_limit_fails_before_the_body(server, tmp_path):
    server.routes["/huge.wav"] = lambda req: Reply(200, {"Content-Length": str(10**12)}, iter([b"RIFF"]))
    with pytest.raises(InputTooLargeError):
        fetch(server.url("/huge.wav"), tmp_path, AddressPolicy(allowlist=parse_allowlist("127.0.0.1")), kind="audio")
    assert leftovers(tmp_path) == []


def test_a_body_shorter_than_its_content_length_is_an_incomplete_file(server, tmp_path):
    server.routes["/short.mp4"] = lambda req: Reply(200, {"Content-Length": "10000", "Connection": "close"},
                                                    VIDEO_BYTES[:100])
    with pytest.raises(InvalidInputError, match="arrived incomplete"):
        fetch(server.url("/short.mp4"), tmp_path, AddressPolicy(allowlist=parse_allowlist("127.0.0.1")))
    assert leftovers(tmp_path) == []


def test_a_server_that_stops_sending_hits_the_read_timeout(server, tmp_path):
    def stall(req):
        def chunks():
            yield b"\x00" * 100
            time.sleep(1.5)
            yield b"\x00"
        return Reply(200, {}, chunks())

    server.routes["/stall.mp4"] = stall
    with pytest.raises(InvalidInputError, match="sent nothing for 0.3 s"):
        fetch(server.url("/stall.mp4"), tmp_path, AddressPolicy(allowlist=parse_allowlist("127.0.0.1")),
              url_read_timeout_s=0.3)
    assert leftovers(tmp_path) == []


def test_a_trickling_server_hits_the_total_time_bound(server, tmp_path):
    def trickle(req):
        def chunks():
            for _ in range(100):
                time.sleep(0.05)
                yield b"\x00" * 10
        return Reply(200, {}, chunks())

    server.routes["/slow.mp4"] = trickle
    with pytest.raises(InvalidInputError, match="took longer than 0.3 s"):
        fetch(server.url("/slow.mp4"), tmp_path, AddressPolicy(allowlist=parse_allowlist("127.0.0.1")),
              url_max_fetch_s=0.3)
    assert leftovers(tmp_path) == []


def test_http_errors_and_formats(server, tmp_path):
    policy = AddressPolicy(allowlist=parse_allowlist("127.0.0.1"))
    with pytest.raises(InvalidInputError, match="answered HTTP 404"):
        fetch(server.url("/missing.mp4"), tmp_path, policy)
    # the name is only a hint (the content decides later): the path's extension, else the
    # Content-Type's, else none at all -- never a refusal
    server.routes["/blob"] = lambda req: Reply(200, {"Content-Type": "audio/mpeg"}, b"ID3" + b"\x00" * 100)
    assert fetch(server.url("/blob?sig=abc"), tmp_path, policy, kind="audio").file_name == "input_audio.mp3"
    server.routes["/key"] = lambda req: Reply(200, {"Content-Type": "application/octet-stream"}, b"\x00" * 100)
    assert fetch(server.url("/key"), tmp_path, policy).file_name == "input_video"
    server.routes["/to-ftp"] = lambda req: Reply(302, {"Location": "ftp://127.0.0.1/a.mp4"})
    with pytest.raises(InvalidInputError, match="not http or https"):
        fetch(server.url("/to-ftp"), tmp_path, policy)
    for url in ("file:///etc/passwd", "ftp://example.com/a.mp4", "gopher://x/"):
        with pytest.raises(URLRefusedError, match="only http and https"):
            fetch(url, tmp_path, policy)


def test_s3_urls_need_object_storage_and_obey_the_same_limit(tmp_path):
    spec = SPECS["audio"]
    with pytest.raises(URLRefusedError, match="object storage"):
        fetch_input("s3://bucket/speech.wav", tmp_path, spec, settings=settings())
    got = fetch_input("s3://bucket/in/speech.wav", tmp_path, spec, settings=settings(),
                      s3_reader=lambda url: iter([b"RIFF", b"\x00" * 100]))
    assert got.file_name == "input_audio.wav" and got.size == 104 and got.source == "s3://bucket/in/speech.wav"
    with pytest.raises(InputTooLargeError):
        fetch_input("s3://bucket/big.wav", tmp_path, spec, settings=settings(),
                    s3_reader=lambda url: (b"\x00" * 4096 for _ in range(100)))
    assert leftovers(tmp_path) == ["input_audio.wav"]


def test_allowlist_from_the_environment(monkeypatch):
    monkeypatch.setenv("LIP_SYNC_URL_ALLOWLIST", "files.internal, *.bucket.local ,127.0.0.1")
    policy = default_policy(resolve_timeout_s=FetchSettings().url_connect_timeout_s)
    assert policy.allowlist == {"files.internal", "*.bucket.local", "127.0.0.1"}
    dns = FakeDNS({"files.internal": ["10.0.0.5"], "a.bucket.local": ["10.0.0.6"], "bucket.local": ["10.0.0.7"]})
    policy = AddressPolicy(allowlist=policy.allowlist, resolver=dns)
    assert policy.vet("files.internal", 80) == ["10.0.0.5"]
    assert policy.vet("A.Bucket.Local.", 80) == ["10.0.0.6"]  # case and trailing dot do not matter
    with pytest.raises(URLRefusedError):
        policy.vet("bucket.local", 80)  # *.x matches subdomains, not x itself
