"""Flag and config-file validation: bad input exits 2 with one line naming flag, value and
what is allowed, before any network activity."""

import subprocess
import sys
import threading

import pytest

from peer.cli import parse_config
from peer.config import ConfigError, RunSpec, read_initial_peers_file, spec_conflicts


@pytest.mark.parametrize("argv, needle", [
    (["--codec", "int2"], "--codec: 'int2' is not valid; expected one of fp32, fp16, bf16, int8, int4, sparse"),
    (["--codec", "sparse", "--sparse-density", "0.0001"], "--sparse-density: 0.0001 is not valid"),
    (["--weighting", "speed"], "--weighting: 'speed' is not valid"),
    (["--aggregator", "median"], "--aggregator: 'median' is not valid; expected one of mean, trimmed-mean, "
                                 "centered-clip"),
    (["--trim-fraction", "0.5"], "--trim-fraction: 0.5 is not valid; expected a number in [0, 0.45]"),
    (["--clip-tau", "0"], "--clip-tau: 0.0 is not valid"),
    (["--clip-iters", "0"], "--clip-iters: 0 is not valid; expected an integer from 1 to 100"),
    (["--device", "tpu"], "--device: 'tpu' is not valid; expected auto, cpu, cuda or cuda:N"),
    (["--port", "70000"], "--port: 70000 is not valid"),
    (["--target-steps", "0"], "--target-steps: 0 is not valid"),
    (["--eval-every", "-1"], "--eval-every: -1 is not valid; expected an integer >= 0"),
    (["--outer-momentum", "1.5"], "--outer-momentum: 1.5 is not valid"),
    (["--initial-peers", "localhost:31337"], "--initial-peers: 'localhost:31337' is not valid; expected a multiaddr"),
    (["--announce-addr", "nohost"], "--announce-addr: 'nohost' is not valid; expected host:port"),
    (["--run-id", "a b"], "--run-id: 'a b' is not valid"),
    (["--progress", "yes"], "--progress: 'yes' is not valid; expected auto (a bar on a terminal), on or off"),
    (["--huge-pages", "yes"], "--huge-pages: 'yes' is not valid; expected on or off"),
])
def test_bad_values_are_named(argv, needle):
    with pytest.raises(ConfigError, match=".*") as e:
        parse_config(argv)
    assert needle in str(e.value)


def test_config_file_and_flags(tmp_path):
    f = tmp_path / "peer.toml"
    f.write_text('codec = "fp32"\nbatch-size = 4\ninitial_peers = "/ip4/10.0.0.1/tcp/31337/p2p/QmX"\n')
    cfg, explicit = parse_config(["--config", str(f), "--batch-size", "6"])
    assert cfg.batch_size == 6 and cfg.spec.codec == "fp32"
    assert cfg.initial_peers == ("/ip4/10.0.0.1/tcp/31337/p2p/QmX",)
    assert explicit == {"codec"}


def test_config_file_errors(tmp_path):
    f = tmp_path / "peer.toml"
    f.write_text("no_such_key = 1\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_config(["--config", str(f)])
    f.write_text("batch_size = 'x'\n")
    with pytest.raises(ConfigError, match="--batch-size: 'x' is not valid"):
        parse_config(["--config", str(f)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["--config", str(tmp_path / "missing.toml")])


def test_spec_conflicts_name_the_runs_value():
    run = RunSpec(codec="int8", outer_lr=0.7)
    wanted = RunSpec(codec="fp32", outer_lr=0.7)
    lines = spec_conflicts(run, wanted, {"codec", "outer_lr"})
    assert lines == ["--codec 'fp32' conflicts with the run's value 'int8'; drop the flag to adopt the run's value"]
    assert RunSpec().hash() != RunSpec(codec="fp32").hash()
    assert RunSpec().hash() != RunSpec(aggregator="trimmed-mean").hash()   # every peer reduces alike


def test_sparse_brings_its_outer_defaults_which_flags_still_set():
    cfg, explicit = parse_config(["--codec", "sparse"])
    assert (cfg.spec.outer_lr, cfg.spec.outer_momentum, cfg.spec.ef_decay) == (2.0, 0.0, 0.95)
    assert explicit == {"codec"}, "a codec's defaults are no conflict with a run that set others"
    cfg, explicit = parse_config(["--codec", "sparse", "--outer-momentum", "0.9", "--ef-decay", "1"])
    assert (cfg.spec.outer_lr, cfg.spec.outer_momentum, cfg.spec.ef_decay) == (2.0, 0.9, 1.0)
    cfg, _ = parse_config(["--codec", "int4"])
    assert (cfg.spec.outer_lr, cfg.spec.outer_momentum, cfg.spec.ef_decay) == (0.7, 0.9, 1.0)
    with pytest.raises(ConfigError, match="--ef-decay: 0.0 is not valid; expected a number in"):
        parse_config(["--ef-decay", "0"])


def test_aggregator_flags_reach_the_spec():
    cfg, explicit = parse_config(["--aggregator", "centered-clip", "--clip-tau", "2", "--clip-iters", "5"])
    assert (cfg.spec.aggregator, cfg.spec.clip_tau, cfg.spec.clip_iters) == ("centered-clip", 2.0, 5)
    assert explicit == {"aggregator", "clip_tau", "clip_iters"} and RunSpec().aggregator == "mean"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv, needle", [
    (["--batch-size", "0"], "--batch-size: 0 is not valid"),
    (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_peer_command_exits_2(argv, needle):
    p = subprocess.run([sys.executable, "-m", "peer.cli", *argv], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr


def test_environment_variables_sit_between_config_file_and_flags(tmp_path, monkeypatch):
    f = tmp_path / "peer.toml"
    f.write_text("timeout_floor_s = 3.0\nbatch_size = 4\n")
    monkeypatch.setenv("DILOCO_TIMEOUT_FLOOR_S", "7")
    monkeypatch.setenv("DILOCO_BATCH_SIZE", "5")
    monkeypatch.setenv("DILOCO_INITIAL_PEERS", "/ip4/10.0.0.1/tcp/1/p2p/QmA /ip4/10.0.0.2/tcp/1/p2p/QmB")
    cfg, _ = parse_config(["--config", str(f), "--batch-size", "6"])
    assert cfg.timeout_floor_s == 7.0 and cfg.batch_size == 6 and len(cfg.initial_peers) == 2
    monkeypatch.setenv("DILOCO_TIMEOUT_CEILING_S", "2")
    with pytest.raises(ConfigError, match="--timeout-floor-s: 7.0 is not valid"):
        parse_config([])


def test_initial_peers_file_flags_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="--initial-peers-file: '.*/nowhere/join.txt' is not valid; expected a "
                                          "file in a directory that exists"):
        parse_config(["--initial-peers-file", str(tmp_path / "nowhere" / "join.txt")])
    with pytest.raises(ConfigError, match="--initial-peers-file-wait-s: 0.0 is not valid"):
        parse_config(["--initial-peers-file", str(tmp_path / "join.txt"), "--initial-peers-file-wait-s", "0"])
    cfg, _ = parse_config(["--initial-peers-file", str(tmp_path / "join.txt")])  # the file may come later
    assert cfg.initial_peers_file == str(tmp_path / "join.txt") and cfg.initial_peers == ()


def test_initial_peers_file_is_read_like_the_flag(tmp_path):
    f = tmp_path / "join.txt"
    f.write_text("# written by bootstrap --join-file\n/ip4/10.0.0.1/tcp/31337/p2p/QmA\n\n"
                 "  /dns4/boot.example/tcp/1/p2p/QmB  \n")
    assert read_initial_peers_file(str(f), 1) == ("/ip4/10.0.0.1/tcp/31337/p2p/QmA", "/dns4/boot.example/tcp/1/p2p/QmB")
    f.write_text("/ip4/10.0.0.1/tcp/31337/p2p/QmA\nlocalhost:31337\n")
    with pytest.raises(ConfigError) as e:
        read_initial_peers_file(str(f), 1)
    assert str(e.value) == (f"--initial-peers-file {f} line 2: 'localhost:31337' is not valid; expected a multiaddr "
                            "such as /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW...")


def test_initial_peers_file_is_waited_for_until_its_deadline(tmp_path):
    f = tmp_path / "join.txt"
    with pytest.raises(ConfigError, match=f"--initial-peers-file: '{f}' does not exist after waiting 0.3 s"):
        read_initial_peers_file(str(f), 0.3, poll_s=0.05)
    f.write_text("\n")
    with pytest.raises(ConfigError, match="holds no multiaddr after waiting 0.3 s"):
        read_initial_peers_file(str(f), 0.3, poll_s=0.05)
    f.unlink()
    writer = threading.Timer(0.5, f.write_text, ("/ip4/10.0.0.1/tcp/31337/p2p/QmA\n",))
    writer.start()
    try:
        assert read_initial_peers_file(str(f), 60, poll_s=0.05) == ("/ip4/10.0.0.1/tcp/31337/p2p/QmA",)
    finally:
        writer.cancel()


@pytest.mark.timeout(90)
def test_peer_exits_2_naming_a_missing_initial_peers_file(tmp_path):
    f = tmp_path / "join.txt"
    p = subprocess.run([sys.executable, "-m", "peer.cli", "--initial-peers-file", str(f),
                        "--initial-peers-file-wait-s", "1", "--model", "tiny"],
                       capture_output=True, text=True, timeout=90)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"--initial-peers-file: '{f}' does not exist after waiting 1 s" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
