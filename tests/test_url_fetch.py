"""nvlm_engine.fetch: the URL policy holds on every redirect, before any connection, and errors leak nothing.

A hostile image host runs on 127.0.0.1 (and a second one on 127.0.0.2 where a redirect must
not arrive). A fake resolver stands in for DNS where a name must resolve to a given address;
`_open_connection` is watched, so "refused before connecting" is checked, not assumed.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import pytest
from hostile_http import SECRET, SECRET_TYPE, body, hang, hostile_server, png_bytes, redirect

from nvlm_engine import fetch
from nvlm_engine.errors import (
    ImageDecodeError,
    ImageOptionsError,
    ImageSourceError,
    ImageTooLargeError,
    ImageURLRefusedError,
)
from nvlm_engine.fetch import FetchPolicy, fetch_url, is_public_address
from nvlm_engine.images import load_image, read_source

LOOPBACK_ONLY = FetchPolicy(allowed_hosts=("127.0.0.1",))  # an IP literal listed is an explicit permission
PRIVATE_OK = FetchPolicy(allow_private_addresses=True)


@pytest.fixture
def server():
    with hostile_server("127.0.0.1") as state:
        yield state



def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> list[str]:
    """Resolve the given names to the given addresses, IP literals as usual, and nothing else; returns the names asked."""
    asked: list[str] = []

    def resolve(host: str, port: int) -> list[tuple]:
        asked.append(host)
        if host not in answers:
            # Numeric only: a test never sends a DNS query off this machine.
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        out = []
        for address in answers[host]:
            ip = ipaddress.ip_address(address)
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            sockaddr = (address, port) if ip.version == 4 else (address, port, 0, 0)
            out.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
        return out

    monkeypatch.setattr(fetch, "_resolve", resolve)
    return asked


def get(url: str, policy: FetchPolicy, **limits: float) -> bytes:
    return fetch_url(url, policy, max_bytes=int(limits.get("max_bytes", 10**6)), timeout_s=limits.get("timeout_s", 5.0),
                     deadline=limits.get("deadline"))


# --- which addresses are public ------------------------------------------------------------


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.0.0.2", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
    "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1",
    "::ffff:169.254.169.254", "2002:7f00:1::1", "::127.0.0.1", "192.0.2.1", "2001:db8::1", "64:ff9b::a9fe:a9fe",
])
def test_non_public_addresses(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111"])
def test_public_addresses(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


def test_policy_validates_itself() -> None:
    with pytest.raises(ImageOptionsError, match="schemes"):
        FetchPolicy(schemes=("file",))
    with pytest.raises(ImageOptionsError, match="max_redirects"):
        FetchPolicy(max_redirects=-1)
    policy = FetchPolicy(allowed_hosts=("Images.Example.COM.", ".cdn.example.com"))
    assert policy.host_allowed("images.example.com") and policy.host_allowed("a.cdn.example.com")
    assert not policy.host_allowed("cdn.example.com") and not policy.host_allowed("evilimages.example.com")


# --- the first hop -------------------------------------------------------------------------


def test_allowed_fetch_connects_to_the_checked_address_with_the_name_as_host(server, connections, monkeypatch) -> None:
    server.routes["/a.png"] = body(png_bytes())
    asked = fake_dns(monkeypatch, {"images.test": ["127.0.0.1"]})
    policy = FetchPolicy(allowed_hosts=("images.test",), allow_private_addresses=True)
    assert get(f"http://images.test:{server.port}/a.png", policy) == png_bytes()
    assert asked == ["images.test"]  # resolved once: no second answer can slip in before connecting
    assert connections == ["127.0.0.1"]
    assert server.hits == [("/a.png", f"images.test:{server.port}")]


def test_loopback_is_refused_by_default_without_connecting(server, connections) -> None:
    server.routes["/a.png"] = body(png_bytes())
    with pytest.raises(ImageURLRefusedError, match="non-public address.*--allow-private-image-hosts"):
        get(f"{server.base}/a.png", FetchPolicy())
    with pytest.raises(ImageURLRefusedError, match="non-public"):  # load_image's default policy is the same
        load_image(f"{server.base}/a.png", allow_url_fetch=True)
    assert connections == [] and server.hits == []


def test_a_name_with_one_private_answer_is_refused(server, connections, monkeypatch) -> None:
    fake_dns(monkeypatch, {"mixed.test": ["8.8.8.8", "10.0.0.7"]})
    with pytest.raises(ImageURLRefusedError, match="non-public"):
        get("http://mixed.test/a.png", FetchPolicy())
    assert connections == []


def test_host_allowlist_and_scheme_are_checked_first(connections) -> None:
    with pytest.raises(ImageURLRefusedError, match="not on the allowlist"):
        get("http://elsewhere.test/a.png", LOOPBACK_ONLY)
    with pytest.raises(ImageURLRefusedError, match="scheme 'ftp'"):
        get("ftp://127.0.0.1/a.png", LOOPBACK_ONLY)
    assert connections == []


# --- every redirect ------------------------------------------------------------------------


def test_redirect_to_another_loopback_address_is_refused_when_only_one_is_allowed(server, connections) -> None:
    with hostile_server("127.0.0.2") as other:
        other.routes["/a.png"] = body(png_bytes())
        server.routes["/hop"] = redirect(f"{other.base}/a.png")
        for policy in (LOOPBACK_ONLY, FetchPolicy(allowed_hosts=("127.0.0.1",), allow_private_addresses=True)):
            with pytest.raises(ImageURLRefusedError, match="redirect 1 .*not on the allowlist"):
                get(f"{server.base}/hop", policy)
        assert other.hits == [] and "127.0.0.2" not in connections
        assert get(f"{server.base}/hop", PRIVATE_OK) == png_bytes()  # allowed explicitly, it is followed
        assert other.hits == [("/a.png", f"127.0.0.2:{other.port}")]


def test_redirect_to_the_metadata_address_is_refused_before_connecting(server, connections, monkeypatch) -> None:
    server.routes["/meta-literal"] = redirect("http://169.254.169.254/latest/meta-data/")
    server.routes["/meta-name"] = redirect("http://metadata.evil.test/latest/meta-data/")
    server.routes["/meta-mapped"] = redirect("http://mapped.evil.test/latest/")
    fake_dns(monkeypatch, {"metadata.evil.test": ["169.254.169.254"], "mapped.evil.test": ["::ffff:169.254.169.254"]})
    # The names are allow-listed, so only the address check stands between them and the metadata service.
    policy = FetchPolicy(allowed_hosts=("127.0.0.1", ".evil.test"))
    with pytest.raises(ImageURLRefusedError, match="not on the allowlist"):
        get(f"{server.base}/meta-literal", policy)
    with pytest.raises(ImageURLRefusedError, match="redirect 1 .*non-public address") as refused:
        get(f"{server.base}/meta-name", policy)
    assert "169.254" not in str(refused.value) and "metadata" not in str(refused.value)  # no DNS oracle
    with pytest.raises(ImageURLRefusedError, match="non-public address"):
        get(f"{server.base}/meta-mapped", policy)
    assert all(not address.startswith(("169.254", "::ffff:169")) for address in connections)
    assert connections == ["127.0.0.1"] * 3


def test_redirect_to_another_scheme_is_refused(server, connections) -> None:
    server.routes["/file"] = redirect("file:///etc/passwd")
    with pytest.raises(ImageURLRefusedError, match="redirect 1 .*scheme is not one of http, https"):
        get(f"{server.base}/file", LOOPBACK_ONLY)
    server.routes["/plain"] = redirect(f"{server.base}/a.png")
    with pytest.raises(ImageURLRefusedError, match="scheme"):
        get(f"{server.base}/plain", FetchPolicy(schemes=("https",), allowed_hosts=("127.0.0.1",)))
    assert connections == ["127.0.0.1"]  # the https-only policy refused the first URL itself


def test_redirect_loops_and_long_chains_stop_at_max_redirects(server) -> None:
    server.routes["/loop"] = redirect("/loop")
    with pytest.raises(ImageURLRefusedError, match="more than 3 redirects"):
        get(f"{server.base}/loop", LOOPBACK_ONLY)
    assert len(server.hits) == 4  # the URL and three redirects, not one more
    for n in range(5):
        server.routes[f"/chain{n}"] = redirect(f"/chain{n + 1}", status=(301, 302, 303, 307, 308)[n])
    server.routes["/chain5"] = body(png_bytes())
    with pytest.raises(ImageURLRefusedError, match="more than 4 redirects"):
        get(f"{server.base}/chain0", FetchPolicy(allowed_hosts=("127.0.0.1",), max_redirects=4))
    assert get(f"{server.base}/chain0", FetchPolicy(allowed_hosts=("127.0.0.1",), max_redirects=5)) == png_bytes()


# --- errors quote nothing the server sent --------------------------------------------------


def test_non_image_body_and_its_content_type_stay_out_of_the_error(server) -> None:
    server.routes["/page"] = body(f"{SECRET} <html>not an image</html>".encode(), SECRET_TYPE)
    with pytest.raises(ImageDecodeError) as error:
        load_image(f"{server.base}/page", allow_url_fetch=True, fetch_policy=LOOPBACK_ONLY)
    message = str(error.value)
    assert f"{server.base}/page" in message and "not an image format" in message
    assert SECRET not in message and SECRET[:8] not in message and "secret" not in message.lower()


def test_error_status_reason_and_location_stay_out_of_the_error(server, monkeypatch) -> None:
    server.routes["/denied"] = body(SECRET.encode(), SECRET_TYPE, status=403, reason=SECRET)
    with pytest.raises(ImageSourceError, match="HTTP 403 Forbidden") as error:
        get(f"{server.base}/denied", LOOPBACK_ONLY)
    assert SECRET not in str(error.value)
    server.routes["/leak"] = redirect(f"http://{SECRET.lower()}.internal.test/")
    for policy in (LOOPBACK_ONLY, FetchPolicy(allowed_hosts=("127.0.0.1", ".internal.test"))):
        fake_dns(monkeypatch, {f"{SECRET.lower()}.internal.test": ["10.0.0.1"]})
        with pytest.raises(ImageURLRefusedError) as error:
            get(f"{server.base}/leak", policy)
        assert SECRET.lower() not in str(error.value).lower() and "10.0.0.1" not in str(error.value)


def test_malformed_response_line_stays_out_of_the_error() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def answer() -> None:
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(f"{SECRET} garbage\r\n\r\n".encode())
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        with pytest.raises(ImageSourceError, match="malformed HTTP response") as error:
            get(f"http://127.0.0.1:{port}/x.png", LOOPBACK_ONLY)
        assert SECRET not in str(error.value)
    finally:
        listener.close()


def test_local_file_bytes_stay_out_of_the_error(tmp_path) -> None:
    secret_file = tmp_path / "notes.png"
    secret_file.write_bytes(f"{SECRET}\n".encode())
    with pytest.raises(ImageDecodeError) as error:
        load_image(secret_file)
    assert SECRET[:6] not in str(error.value)


# --- limits --------------------------------------------------------------------------------


def test_a_hanging_host_times_out_within_the_timeout(server) -> None:
    server.routes["/slow"] = hang(10)
    start = time.monotonic()
    with pytest.raises(ImageSourceError, match="longer than 0.5 s.*fetch_timeout_s"):
        get(f"{server.base}/slow", LOOPBACK_ONLY, timeout_s=0.5)
    assert time.monotonic() - start < 2.0


def test_a_shared_deadline_ends_the_fetch_before_its_own_timeout(server) -> None:
    server.routes["/slow"] = hang(10)
    start = time.monotonic()
    with pytest.raises(ImageSourceError, match="longer than 0.3 s"):
        get(f"{server.base}/slow", LOOPBACK_ONLY, timeout_s=5.0, deadline=start + 0.3)
    assert time.monotonic() - start < 1.5


def test_size_limit_holds_on_the_final_hop(server) -> None:
    server.routes["/big"] = body(b"\0" * 50_000)
    server.routes["/to-big"] = redirect("/big")
    with pytest.raises(ImageTooLargeError, match="max_bytes=1000"):
        get(f"{server.base}/to-big", LOOPBACK_ONLY, max_bytes=1000)


def test_read_source_uses_the_policy_and_labels_without_the_content_type(server) -> None:
    server.routes["/a.png"] = body(png_bytes(), SECRET_TYPE)
    data, label = read_source(f"{server.base}/a.png", allow_url_fetch=True, max_bytes=10**6, fetch_timeout_s=5,
                              fetch_policy=LOOPBACK_ONLY)
    assert data == png_bytes() and SECRET_TYPE not in label
    with pytest.raises(ImageSourceError, match="URL fetching is off"):
        read_source(f"{server.base}/a.png", allow_url_fetch=False, max_bytes=10**6, fetch_timeout_s=5,
                    fetch_policy=PRIVATE_OK)
