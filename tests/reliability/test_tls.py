"""wss:// end to end: `trainer serve --certfile --keyfile --token-file` with a certificate made
here (a throwaway CA and a server certificate for 127.0.0.1), and `edge-run train --ca` verifying
it. Without the CA the device fails verification at once with a message that says to pass --ca;
verification is never turned off. A plain ws:// client gets no session from a TLS port."""

import datetime
import ipaddress
import shutil
import subprocess

import pytest
from websockets.sync.client import connect

pytest.importorskip("torch")

from mobillm.edge_runtime import cli  # noqa: E402

pytestmark = pytest.mark.slow  # real servers, processes or builds: the `-m "not slow"` loop skips them


def make_certs_with_cryptography(folder):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mobillm test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(cert.public_bytes(pem))
    (folder / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))


def make_certs_with_openssl(folder):
    run = lambda *args: subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
        "-subj", "/CN=mobillm test CA", "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "ext.cnf", "-out", "server.pem")


@pytest.fixture
def certs(tmp_path):
    folder = tmp_path / "tls"
    folder.mkdir()
    try:
        make_certs_with_cryptography(folder)
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available to make a certificate")
        make_certs_with_openssl(folder)
    return folder


def test_wss_with_token_verified_by_ca(tiny_engine, tmp_path, certs, server_process, rows_file, capsys, report):
    token = tmp_path / "token"
    token.write_text("tls-token-7d1e\n")
    server = server_process("tls", "--certfile", str(certs / "server.pem"), "--keyfile", str(certs / "server.key"),
                            "--token-file", str(token))
    server.start()
    assert server.url.startswith("wss://") and "trainer serving on wss://" in server.log_text()
    data = rows_file(24)
    base = ["train", "--engine", str(tiny_engine), "--data", str(data), "--task", "sst2", "--server", server.url,
            "--batch-size", "8", "--threads", "1", "-q"]

    # Without --ca: the self-signed chain is not trusted, and that is final (no retries, no fallback).
    capsys.readouterr()
    assert cli.main(base + ["--token-file", str(token), "--run", "no-ca"]) == 2
    err = capsys.readouterr().err
    assert "certificate could not be verified" in err and "--ca" in err, err

    # With --ca but a wrong token: refused by the server.
    wrong = tmp_path / "wrong"
    wrong.write_text("tls-token-7d1f\n")
    assert cli.main(base + ["--ca", str(certs / "ca.pem"), "--token-file", str(wrong), "--run", "wrong"]) == 2
    assert "missing or wrong token" in capsys.readouterr().err

    # A plain ws:// client gets no WebSocket session from the TLS port.
    with pytest.raises(Exception):
        with connect(server.url.replace("wss://", "ws://"), open_timeout=5):
            pass

    side = tmp_path / "side.onnx"
    stats = tmp_path / "stats.json"
    assert cli.main(base + ["--ca", str(certs / "ca.pem"), "--token-file", str(token), "--run", "tls",
                            "--side-out", str(side), "--stats-out", str(stats)]) == 0
    assert side.is_file() and side.stat().st_size > 1000
    assert (server.runs / "tls" / "side_network.onnx").read_bytes() == side.read_bytes()
    assert not (server.runs / "no-ca").exists() and not (server.runs / "wrong").exists()
    assert server.terminate() == 0
    report(tls="wss verified with --ca", refused=["no CA", "wrong token", "plain ws"])
