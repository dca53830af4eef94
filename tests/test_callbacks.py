"""Callbacks on the wire: which URLs are accepted at submit, the signature, and the SSRF-safe
POST against a real HTTP receiver on loopback."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer import callbacks
from producer.errors import InvalidRequest
from producer.request import parse_request
from producer.settings import Settings
from tests.support.receiver import CALLBACK_SECRET, Receiver

RECORD = {"id": "2b0d3a52-4c8e-4d0c-9a57-0f1e4c1d2e3f", "status": "succeeded"}


def _submit(url: str) -> None:
    parse_request({"input": "s3://photos/a.jpg", "callback_url": url})


def _settings(base: Settings, **changes: object) -> Settings:
    return Settings(**{**base.model_dump(), **changes})


# --- the signature ------------------------------------------------------------------------


def test_a_signed_body_verifies_with_the_secret() -> None:
    body = callbacks.body_of(RECORD)
    header = callbacks.sign(CALLBACK_SECRET, body, 1_800_000_000)
    assert header.startswith("t=1800000000,v1=")
    assert callbacks.verify_signature(CALLBACK_SECRET, header, body, now=1_800_000_010)


def test_a_signature_fails_for_another_body_secret_or_an_old_timestamp() -> None:
    body = callbacks.body_of(RECORD)
    header = callbacks.sign(CALLBACK_SECRET, body, 1_800_000_000)
    assert not callbacks.verify_signature(CALLBACK_SECRET, header, body + b" ", now=1_800_000_000)
    assert not callbacks.verify_signature("other", header, body, now=1_800_000_000)
    assert not callbacks.verify_signature(CALLBACK_SECRET, header, body, now=1_800_000_301)
    assert not callbacks.verify_signature(CALLBACK_SECRET, "v1=abc", body)
    assert not callbacks.verify_signature(CALLBACK_SECRET, "", body)


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body_as_the_spec_says() -> None:
    import hashlib
    import hmac

    body = b'{"id":"x"}'
    expected = hmac.new(CALLBACK_SECRET.encode(), b"42." + body, hashlib.sha256).hexdigest()
    assert callbacks.sign(CALLBACK_SECRET, body, 42) == f"t=42,v1={expected}"


# --- submit-time rules --------------------------------------------------------------------


def test_a_callback_url_is_refused_when_the_service_has_no_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from producer import settings as settings_module

    monkeypatch.setattr(settings_module, "_current", Settings(callback_secret=None))
    with pytest.raises(InvalidRequest, match="BACKDROP_CALLBACK_SECRET"):
        _submit("https://hooks.example.com/backdrop")


def test_an_https_url_to_a_public_name_is_accepted_and_kept_out_of_params(
    callback_settings: Settings,
) -> None:
    request = parse_request(
        {"input": "s3://photos/a.jpg", "callback_url": "https://hooks.example.com/b?x=1"}
    )
    assert request.callback_url == "https://hooks.example.com/b?x=1"
    assert "callback_url" not in request.params()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://hooks.example.com/b", "http:// is allowed only to hosts in"),
        ("ftp://hooks.example.com/b", "must start with https://"),
        ("https://user:pw@hooks.example.com/b", "credentials"),
        ("https://hooks.example.com/b#frag", "fragment"),
        ("https:///b", "no host"),
        ("https://hooks.example.com:99999/b", "invalid port"),
        ("https://bad_host!.example/b", "not a valid name"),
        ("https://hooks.example.com/a b", "spaces"),
        ("https://hooks.example.com/" + "a" * 2048, "at most 2048|longer than"),
        ("https://10.1.2.3/b", "private, loopback"),
        ("https://169.254.169.254/latest/meta-data", "private, loopback"),
        ("https://[::1]/b", "private, loopback"),
        ("https://[::ffff:127.0.0.1]/b", "private, loopback"),
        ("https://localhost/b", "private, loopback"),
    ],
)
def test_a_callback_url_that_can_never_be_called_is_refused_at_submit(
    callback_settings: Settings, url: str, reason: str
) -> None:
    with pytest.raises(InvalidRequest, match=f"callback_url: .*({reason})"):
        _submit(url)


def test_an_http_url_or_a_private_address_is_accepted_when_its_host_is_listed(
    callback_settings: Settings, receiver: Receiver
) -> None:
    _submit(receiver.url())
    with pytest.raises(InvalidRequest, match="not listed"):
        _submit(f"http://127.0.0.1:{receiver.port + 1}/b")  # listed with another port


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),
        ("169.254.169.254", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:10.0.0.1", False),
        ("2002:7f00:1::", False),  # 6to4 around 127.0.0.1
    ],
)
def test_only_internet_addresses_count_as_public(address: str, public: bool) -> None:
    assert callbacks.public(ipaddress.ip_address(address)) is public


# --- the POST -----------------------------------------------------------------------------


def test_the_record_is_posted_signed_with_the_job_id_in_a_header(
    callback_settings: Settings, receiver: Receiver
) -> None:
    outcome = callbacks.send(receiver.url("/hooks?src=backdrop"), RECORD, callback_settings)
    assert outcome.delivered and outcome.status_code == 200 and outcome.error is None
    [got] = receiver.wait_for(1)
    assert got.path == "/hooks?src=backdrop"
    assert json.loads(got.body) == RECORD
    assert got.headers["Backdrop-Job-Id"] == RECORD["id"]
    assert got.headers["Content-Type"] == "application/json"
    assert callbacks.verify_signature(CALLBACK_SECRET, got.headers["Backdrop-Signature"], got.body)


def test_a_non_2xx_answer_is_a_failed_attempt(
    callback_settings: Settings, receiver: Receiver
) -> None:
    receiver.answer([500])
    outcome = callbacks.send(receiver.url(), RECORD, callback_settings)
    assert not outcome.delivered and outcome.status_code == 500 and outcome.error == "HTTP 500"


def test_a_redirect_is_never_followed(callback_settings: Settings, receiver: Receiver) -> None:
    receiver.answer([302])
    outcome = callbacks.send(receiver.url(), RECORD, callback_settings)
    assert not outcome.delivered
    assert outcome.status_code == 302 and outcome.error == "redirects are not followed"
    assert [r.path for r in receiver.received] == ["/hooks/backdrop"]


def test_a_loopback_receiver_not_listed_is_refused_without_a_connection(
    callback_settings: Settings, receiver: Receiver
) -> None:
    unlisted = _settings(callback_settings, callback_allowed_hosts=[])
    url = f"https://127.0.0.1:{receiver.port}/b"
    outcome = callbacks.send(url, RECORD, unlisted)
    assert not outcome.delivered and outcome.error is not None
    assert outcome.error.startswith("refused: 127.0.0.1 resolves to 127.0.0.1, a private")
    assert receiver.received == []


def test_a_name_that_resolves_to_loopback_is_refused_unless_listed(
    callback_settings: Settings, receiver: Receiver
) -> None:
    """`localhost` through the system resolver (/etc/hosts), and a public-looking name whose
    DNS answer is 127.0.0.1 (a rebinding attack), are both refused."""
    unlisted = _settings(callback_settings, callback_allowed_hosts=[])
    for url, resolver in (
        (f"https://localhost:{receiver.port}/b", callbacks.system_resolver),
        (f"https://hooks.example.com:{receiver.port}/b", lambda _h, _p: ["127.0.0.1"]),
    ):
        outcome = callbacks.send(url, RECORD, unlisted, resolver=resolver)
        assert outcome.error is not None and "a private, loopback" in outcome.error
    assert receiver.received == []


def test_a_name_with_any_private_address_is_refused_whole(callback_settings: Settings) -> None:
    outcome = callbacks.send(
        "https://hooks.example.com/b",
        RECORD,
        callback_settings,
        resolver=lambda _h, _p: ["93.184.216.34", "10.0.0.7"],
    )
    assert outcome.error is not None and "10.0.0.7" in outcome.error


def test_a_listed_name_is_connected_at_the_address_that_was_checked(
    callback_settings: Settings, receiver: Receiver
) -> None:
    """The name is resolved once; the connection goes to that answer (no second lookup a
    rebinding DNS server could answer differently), and Host still names the host."""
    lookups: list[str] = []

    def resolver(host: str, _port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]

    listed = _settings(callback_settings, callback_allowed_hosts=["hooks.internal"])
    url = f"http://hooks.internal:{receiver.port}/b"
    assert callbacks.send(url, RECORD, listed, resolver=resolver).delivered
    assert lookups == ["hooks.internal"]
    assert receiver.wait_for(1)[0].headers["Host"] == f"hooks.internal:{receiver.port}"


def test_a_receiver_that_never_answers_is_cut_off_at_the_deadline(
    callback_settings: Settings, receiver: Receiver
) -> None:
    receiver.release.clear()  # the receiver reads the request and holds its answer
    quick = _settings(callback_settings, callback_timeout_s=0.5)
    outcome = callbacks.send(receiver.url(), RECORD, quick)
    assert not outcome.delivered and outcome.error == "timed out"


def test_an_unreachable_receiver_is_a_failed_attempt(callback_settings: Settings) -> None:
    from tests.support.network import free_port

    port = free_port()
    listed = _settings(callback_settings, callback_allowed_hosts=[f"127.0.0.1:{port}"])
    outcome = callbacks.send(f"http://127.0.0.1:{port}/b", RECORD, listed)
    assert not outcome.delivered and outcome.status_code is None
    assert outcome.error is not None and "refused" in outcome.error.lower()


# --- https: TLS verified against the name, over the checked address ----------------------


@pytest.fixture
def tls_receiver(tmp_path: Path) -> Iterator[tuple[Receiver, ssl.SSLContext]]:
    """An HTTPS receiver with a self-signed certificate for `hooks.test`, and a client
    context that trusts it."""
    cert, key = _self_signed(tmp_path, "hooks.test")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server = Receiver(tls=server_context).start()
    client_context = ssl.create_default_context(cafile=str(cert))
    yield server, client_context
    server.close()


def test_https_verifies_the_certificate_against_the_name_not_the_address(
    callback_settings: Settings, tls_receiver: tuple[Receiver, ssl.SSLContext]
) -> None:
    server, trusted = tls_receiver
    listed = _settings(callback_settings, callback_allowed_hosts=["hooks.test", "other.test"])
    to_loopback = lambda _h, _p: ["127.0.0.1"]  # noqa: E731
    url = f"https://hooks.test:{server.port}/b"
    outcome = callbacks.send(url, RECORD, listed, resolver=to_loopback, tls=trusted)
    assert outcome.delivered, outcome
    wrong_name = f"https://other.test:{server.port}/b"
    outcome = callbacks.send(wrong_name, RECORD, listed, resolver=to_loopback, tls=trusted)
    assert not outcome.delivered and outcome.error is not None and "TLS" in outcome.error
    assert len(server.received) == 1


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
