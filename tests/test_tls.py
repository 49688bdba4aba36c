"""mTLS (API.md: identity by client certificate), the clients file's own checks, reflection
and the start-up line. Certificates are made here with `cryptography`."""
import datetime
import json
import subprocess
import sys

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from yikatong.server.harness import ROOT, ServerProcess, free_address, running, token
from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CA:
    def __init__(self, name: str):
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, cn: str, server: bool = False) -> tuple[bytes, bytes]:
        """(key PEM, certificate PEM) for `cn`, signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30)))
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        cert = builder.sign(self.key, hashes.SHA256())
        return _pem(key), cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other = CA("Yikatong test CA"), CA("Somebody else's CA")
    files = {}
    for name, (key, cert) in {"server": ca.issue("localhost", server=True),
                              "gate": ca.issue("gate-0001"), "stranger": ca.issue("gate-9999"),
                              "forged": other.issue("gate-0001")}.items():
        (d / f"{name}.key").write_bytes(key)
        (d / f"{name}.crt").write_bytes(cert)
        files[name] = (key, cert)
    (d / "ca.crt").write_bytes(ca.pem)
    clients = d / "clients.toml"
    clients.write_text('[[client]]\nid = "gate-0001"\nrole = "TRANSIT_GATE"\n'
                       'cert_cn = "gate-0001"\n\n'
                       '[[client]]\nid = "agency"\nrole = "CARD_AGENCY"\ntoken_sha256 = '
                       f'"{__import__("hashlib").sha256(token("CARD_AGENCY").encode()).hexdigest()}"\n')
    return d, ca.pem, files, clients


def credentials(ca_pem: bytes, who=None):
    if who is None:
        return grpc.ssl_channel_credentials(root_certificates=ca_pem)
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=who[0],
                                        certificate_chain=who[1])


def channel(address: str, creds) -> grpc.Channel:
    return grpc.secure_channel(address, creds, options=(
        ("grpc.ssl_target_name_override", "localhost"),))


def authorize(ch: grpc.Channel, metadata=()):
    return rpc.AuthorizationStub(ch).Authorize(pb.AuthorizeRequest(
        request_id="r", card_number="310000000001", channel=pb.CHANNEL_TRANSIT),
        metadata=metadata, timeout=10)


def test_mtls_the_certificates_cn_is_the_client(pki, tmp_path):
    d, ca, files, clients = pki
    tls = ("--tls-cert", str(d / "server.crt"), "--tls-key", str(d / "server.key"),
           "--tls-ca", str(d / "ca.crt"), "--clients", str(clients))
    s = ServerProcess(tmp_path, *tls, clients=False, credentials=credentials(ca, files["gate"]))
    try:
        # a good certificate: the gate, in its role
        assert authorize(s.channel).reason == pb.DECLINE_REASON_CARD_NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:  # the gate's role, not the agency's
            rpc.LifecycleStub(s.channel).GetCard(pb.GetCardRequest(card_number="1"), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # a bearer token keeps working over TLS, and names the client
        with pytest.raises(grpc.RpcError) as e:
            rpc.LifecycleStub(s.channel).GetCard(
                pb.GetCardRequest(card_number="1"), timeout=10,
                metadata=(("authorization", f"Bearer {token('CARD_AGENCY')}"),))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND  # the agency may read cards
        # signed by our CA, but not a client in the clients file
        with channel(s.address, credentials(ca, files["stranger"])) as ch:
            with pytest.raises(grpc.RpcError) as e:
                authorize(ch)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # another CA's certificate with the right CN, and no certificate: refused at the
        # handshake, no handler reached
        for creds in (credentials(ca, files["forged"]), credentials(ca)):
            with channel(s.address, creds) as ch:
                with pytest.raises(grpc.RpcError) as e:
                    authorize(ch)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # and plaintext is not served at all
        with grpc.insecure_channel(s.address) as ch:
            with pytest.raises(grpc.RpcError) as e:
                authorize(ch, (("authorization", f"Bearer {token('CARD_AGENCY')}"),))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        calls = [json.loads(line) for line in s.output().splitlines()
                 if line.startswith("{") and '"yikatong.access"' in line]
        assert {c["client"] for c in calls} <= {"gate-0001", "agency", ""}
        assert "gate-9999" not in s.output()  # handshake refusals reach no handler
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("entries, says", [
    ('[[client]]\nid = "a"\nrole = "ADMIN"\ncert_cn = "x"\n'
     '[[client]]\nid = "b"\nrole = "TRANSIT_GATE"\ncert_cn = "x"\n',
     "client b: cert_cn 'x' is already the certificate of client a"),
    ('[[client]]\nid = "a"\nrole = "ADMIN"\ntoken_sha256 = "' + "a" * 64 + '"\n'
     '[[client]]\nid = "b"\nrole = "TRANSIT_GATE"\ntoken_sha256 = "' + "a" * 64 + '"\n',
     "client b: token_sha256 is already the token of client a"),
    ('[[client]]\nid = "a"\nrole = "ADMIN"\n',
     "client a has no identity: give token_sha256 or cert_cn"),
])
def test_a_clients_file_with_a_shared_or_missing_identity_stops_start_up(tmp_path, entries,
                                                                         says):
    path = tmp_path / "clients.toml"
    path.write_text(entries)
    out = subprocess.run([sys.executable, "-m", "yikatong", "serve", "--data-dir",
                          str(tmp_path / "d"), "--listen", free_address(), "--clients",
                          str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == f"yikatong: clients file {path}: {says}"


def test_tls_flags_go_together(tmp_path):
    out = subprocess.run([sys.executable, "-m", "yikatong", "serve", "--data-dir",
                          str(tmp_path / "d"), "--tls-cert", "x.pem"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == "yikatong: --tls-cert, --tls-key and --tls-ca go together"


def test_reflection_lists_the_services_and_start_up_says_how_it_serves(tmp_path):
    with running(tmp_path, "--reflection") as s:
        stub = reflection_pb2_grpc.ServerReflectionStub(s.channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=10)
        names = {svc.name for reply in replies
                 for svc in reply.list_services_response.service}
        output = s.output()
    assert {"yikatong.v1.Authorization", "yikatong.v1.CardStatus", "yikatong.v1.Lifecycle",
            "yikatong.v1.Ledger", "yikatong.v1.Admin", "grpc.health.v1.Health"} <= names
    (started,) = [json.loads(line) for line in output.splitlines()
                  if line.startswith("{") and '"msg": "started"' in line]
    assert started["listen"] == s.address and started["tls"] is False
    assert started["workers"] == 1 and started["map_size_mib"] > 0
    assert started["data_dir"].endswith("data") and started["version"]


@pytest.mark.parametrize("flag, marker", [("--tls-key", "PRIVATE KEY"),
                                          ("--tls-cert", "BEGIN CERTIFICATE"),
                                          ("--tls-ca", "BEGIN CERTIFICATE")])
def test_a_tls_file_that_is_not_pem_is_one_clear_line(pki, tmp_path, flag, marker):
    d = pki[0]
    (tmp_path / "junk.pem").write_text("not a key")
    paths = {"--tls-key": d / "server.key", "--tls-cert": d / "server.crt",
             "--tls-ca": d / "ca.crt", flag: tmp_path / "junk.pem"}
    bad = subprocess.run([sys.executable, "-m", "yikatong", "serve", "--workers", "2",
                          "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0",
                          *(str(x) for kv in paths.items() for x in kv)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"yikatong: {flag} is not a PEM file with a {marker}"
