"""What several test folders share: the synthetic sentiment rows they train on, a side network
without a training run (`write_side`), and the
start-many, stop-all-at-teardown shape of their server and proxy fixtures.

Importable as `helpers` from any test module or conftest (pyproject.toml puts tests/ on the
pytest pythonpath). The tiny OPT config lives in the package (mobillm.common.sample.TINY_OPT)
because bench/ exports it too.
"""

from __future__ import annotations

import datetime
import json
import ipaddress
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest

from mobillm.common.sample import write_sample

T = TypeVar("T")

# The tests' sentiment rows: 2..8 of five positive or negative words before "movie".
TEST_ROWS = {"adjectives": (2, 8), "vocabulary": 5, "noun": "movie"}


def write_rows(path: Path, n: int, seed: int = 0, **style) -> Path:
    """An SST-2-style TSV of `n` rows (labels alternate unless `balanced=False`); `style` overrides
    TEST_ROWS (see mobillm.common.sample.sentences)."""
    return write_sample(path, n, seed, **{**TEST_ROWS, **style})


def started_each(factory: Callable[..., T]) -> Iterator[Callable[..., T]]:
    """The body of a fixture that yields make(*args, **kw) -> factory(*args, **kw), started; every
    object made is stopped at teardown. Use as `yield from started_each(LinkProxy)`."""
    made: list = []

    def make(*args, **kwargs) -> T:
        obj = factory(*args, **kwargs)
        obj.start()
        made.append(obj)
        return obj

    yield make
    for obj in made:
        obj.stop()


def make_certs(folder: Path) -> Path:
    """`folder` with a throwaway CA (ca.pem) and a certificate for 127.0.0.1 / localhost it signed
    (server.pem, server.key): made with the cryptography package, else the openssl CLI, else skip."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        make_certs_with_cryptography(folder)
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available to make a certificate")
        make_certs_with_openssl(folder)
    return folder


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


def write_side(engine: Path, out: Path, pooling: str = "last", task: str = "sst2", out_dim: int = 2,
               seed: int = 3, mode: str | None = None, ensemble: int = 1) -> Path:
    """A side network for `engine`'s taps at `out` (+ out.json), with weights that matter; `mode`: the
    rows it was trained on (None: pooled for last pooling, else tokens); `ensemble` > 1: that many
    averaged in one graph, as `trainer serve --ensemble` exports them."""
    torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)
    from mobillm.common.manifest import Manifest, manifest_digest
    from mobillm.trainer.config import SideConfig
    from mobillm.trainer.export import export_onnx
    from mobillm.trainer.model import EnsembleSide, build_side_network

    manifest = Manifest.load(engine, verify=False)
    cfg = SideConfig(pooling=pooling, bottleneck=8).for_taps([t.hidden for t in manifest.taps], out_dim)
    members = [build_side_network(cfg, seed=seed + k).eval() for k in range(ensemble)]
    with torch.no_grad():  # make the adapters matter, as after training
        gen = torch.Generator().manual_seed(seed)
        for p in (p for m in members for p in m.parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    out.write_bytes(export_onnx(members[0] if ensemble == 1 else EnsembleSide(members).eval()))
    meta = {"config": cfg.to_meta(), "task": task, "num_labels": out_dim, "run": "test",
            "taps": [{"layer": t.layer, "hidden": t.hidden, "fmt": t.fmt, "block_size": t.block_size}
                     for t in manifest.taps],
            "engine": str(engine), "model_id": manifest.model_id, "engine_sha256": manifest_digest(engine),
            "mode": mode or ("pooled" if pooling == "last" else "tokens"), "preparation": manifest.preparation}
    out.with_suffix(".json").write_text(json.dumps(meta))
    return out
