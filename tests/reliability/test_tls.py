"""wss:// end to end: `trainer serve --certfile --keyfile --token-file` with a certificate made
here (a throwaway CA and a server certificate for 127.0.0.1), and `edge-run train --ca` verifying
it. Without the CA the device fails verification at once with a message that says to pass --ca;
verification is never turned off. A plain ws:// client gets no session from a TLS port."""

import pytest
from helpers import make_certs
from websockets.sync.client import connect

pytest.importorskip("torch", exc_type=ModuleNotFoundError)

from mobillm.edge_runtime import cli  # noqa: E402

pytestmark = pytest.mark.slow  # real servers, processes or builds: the `-m "not slow"` loop skips them


@pytest.fixture
def certs(tmp_path):
    return make_certs(tmp_path / "tls")


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

    # A plain ws:// client gets no WebSocket session from the TLS port; edge-run says why, without retrying.
    with pytest.raises(Exception):
        with connect(server.url.replace("wss://", "ws://"), open_timeout=5):
            pass
    plain = [a if a != server.url else server.url.replace("wss://", "ws://") for a in base]
    assert cli.main(plain + ["--token-file", str(token), "--run", "plain"]) == 2
    assert "is the server using TLS? try --server wss://" in capsys.readouterr().err

    # A path the server does not serve: its bad_path ERROR (or close reason) reaches the device.
    bad_path = [a if a != server.url else server.url + "/train" for a in base]
    assert cli.main(bad_path + ["--ca", str(certs / "ca.pem"), "--token-file", str(token), "--run", "path"]) == 2
    assert "(bad_path)" in capsys.readouterr().err

    side = tmp_path / "side.onnx"
    stats = tmp_path / "stats.json"
    assert cli.main(base + ["--ca", str(certs / "ca.pem"), "--token-file", str(token), "--run", "tls",
                            "--side-out", str(side), "--stats-out", str(stats)]) == 0
    assert side.is_file() and side.stat().st_size > 1000
    assert (server.runs / "tls" / "side_network.onnx").read_bytes() == side.read_bytes()
    assert not any((server.runs / name).exists() for name in ("no-ca", "wrong", "plain", "path"))
    assert server.terminate() == 0
    report(tls="wss verified with --ca", refused=["no CA", "wrong token", "plain ws"])
