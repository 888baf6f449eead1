"""`trainer`'s flags (the fields of ServerConfig, SideConfig, OptimConfig, FedConfig) and its exit statuses:
2 with one line on stderr for a bad flag, config value, file or run folder, never a traceback."""

import subprocess
import sys

import pytest
from helpers import make_certs

from mobillm.trainer import cli
from mobillm.trainer.config import ConfigError, FedConfig, OptimConfig, ServerConfig, SideConfig


def config(*argv) -> ServerConfig:
    return cli.server_config(cli.build_parser().parse_args(["serve", *argv]))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trainer: error: "), err
    return err[0]


def test_defaults_are_the_dataclass_defaults():
    assert config() == ServerConfig()


def test_flags_build_the_config_a_caller_builds_by_hand(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    assert config("--host", "0.0.0.0", "--port", "0", "--runs", str(tmp_path), "--cache", "--resume",
                  "--token-file", str(token), "--queue", "3", "--checkpoint-every", "10", "--bitplan-every", "0",
                  "--max-frame", "4096", "--max-rows", "64", "--max-tokens", "512", "--threads", "1",
                  "--bottleneck", "16", "--activation", "gelu", "--pooling", "mean", "--side-width", "96",
                  "--lr", "0.01", "--weight-decay", "0", "--warmup-ratio", "0.1", "--grad-clip", "0",
                  "--seed", "7", "--cache-batch-size", "8") == ServerConfig(
        host="0.0.0.0", port=0, runs_dir=str(tmp_path), cache=True, resume=True, token="s3cret", queue_size=3,
        checkpoint_every=10, bitplan_every=0, max_frame=4096, max_rows=64, max_tokens=512, threads=1,
        side=SideConfig(bottleneck=16, activation="gelu", pooling="mean", side_width=96),
        optim=OptimConfig(lr=0.01, weight_decay=0.0, warmup_ratio=0.1, grad_clip=0.0, seed=7, cache_batch_size=8),
        fed=FedConfig(width=96))  # --side-width sets the shared width too, used only with --federated


def test_federated_flags():
    # --side-width is the shared width with --federated; without it the shared width is FedConfig's.
    assert config("--federated") == ServerConfig(federated=True)
    assert config("--federated", "--side-width", "128", "--fed-slots", "6", "--max-share", "0.5",
                  "--share-window", "64", "--fed-warmup", "32") == ServerConfig(
        federated=True, side=SideConfig(side_width=128),
        fed=FedConfig(slots=6, width=128, max_share=0.5, share_window=64, warmup_samples=32))


def test_tls_flags(tmp_path):
    certs = make_certs(tmp_path / "tls")  # validate() loads them: placeholders are refused
    cert, key = certs / "server.pem", certs / "server.key"
    assert config("--certfile", str(cert), "--keyfile", str(key)) == ServerConfig(certfile=str(cert),
                                                                                  keyfile=str(key))


@pytest.mark.parametrize("argv,message", [
    (["--queue", "0"], "queue_size must be >= 1"),
    (["--federated", "--cache"], "--federated and --cache do not combine"),
    (["--federated", "--max-share", "0"], "max_share must be in (0, 1]"),
    (["--lr", "0"], "lr must be > 0"),
    (["--keyfile", "k.pem"], "keyfile needs certfile"),
    (["--certfile", "/no/such/cert.pem"], "certfile /no/such/cert.pem does not exist"),
    (["--device", "tpu"], "device must be cpu, cuda or cuda:N"),
    (["--token-file", "/no/such/token"], "--token-file /no/such/token: cannot read it"),
])
def test_bad_config_values_exit_2_with_one_line(argv, message, capsys):
    assert cli.main(["serve", *argv]) == 2
    assert message in one_error_line(capsys)


def test_config_errors_are_bad_input_and_value_errors():
    with pytest.raises(ConfigError) as exc:
        ServerConfig(queue_size=0).validate()
    assert isinstance(exc.value, ValueError) and exc.value.exit_code == 2


@pytest.mark.parametrize("argv", [["serve", "--queue", "many"], ["serve", "--activation", "tanh"],
                                  ["serve", "--bogus"], ["plot"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("trainer") and ": error: " in err and err.count("\n") == 1, err


def test_missing_run_folders_and_files_exit_2(tmp_path, capsys):
    assert cli.main(["plot", "nope", "--runs", str(tmp_path)]) == 2
    assert "no run folder 'nope'" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert cli.main(["plot", "empty", "--runs", str(tmp_path)]) == 2
    assert "metrics.jsonl not found" in one_error_line(capsys)
    assert cli.main(["export", str(tmp_path / "empty")]) == 2
    assert "config.json not found" in one_error_line(capsys)


@pytest.mark.parametrize("command", ["serve", "plot", "export"])
def test_help_shows_every_default(command, help_entries):
    entries = help_entries(cli.main, [command])
    assert "--runs" in entries
    for flag, text in entries.items():
        if flag != "-h":
            assert "(default" in text, f"{command} {flag}: {text}"
    if command == "serve":
        assert "(default: 8)" in entries["--queue"] and "(default: 4)" in entries["--fed-slots"]


def test_bad_value_is_one_line_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "mobillm.trainer.cli", "serve", "--queue", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["trainer: error: queue_size must be >= 1, got 0"]


def test_world_flags_outside_a_world_exit_2(tmp_path, monkeypatch, capsys):
    """--tick-s and friends are refused by a plain (non-torchrun) `trainer serve`, not silently ignored."""
    from mobillm.trainer import cli as trainer_cli

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert trainer_cli.main(["serve", "--runs", str(tmp_path / "runs"), "--port", "0", "--tick-s", "0.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun" in err[0] and "Traceback" not in err[0]
