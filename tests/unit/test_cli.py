"""The CLI's error contract: one clear line naming the problem, exit code 2, no traceback."""

import pytest

from swarmrt.cli import main


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.mark.parametrize("argv, needle", [
    (["peer", "--config", "x.toml"], "--initial-peers"),
    (["train", "--config", "x.toml", "--initial-peers", "m", "--steps", "many"], "--steps"),
    (["train", "--config", "x.toml", "--initial-peers", "m", "--steps", "0"], "--steps must be >= 1"),
    (["frobnicate"], "frobnicate"),
    (["demo", "--peers-per-stage", "0"], "--peers-per-stage must be >= 1"),
])
def test_bad_flags_exit_2_with_one_line(argv, needle, capsys):
    code, err = run(argv, capsys)
    assert code == 2
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_config_values_exit_2_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "run.toml"
    bad.write_text("[optimizer]\nlr = -1\n")
    code, err = run(["peer", "--config", str(bad), "--initial-peers", "/ip4/127.0.0.1/tcp/1"], capsys)
    assert code == 2 and "optimizer.lr" in err and len(err.splitlines()) == 1
    bad.write_text("[model]\nstages = 3\nfoo = 1\n")
    code, err = run(["train", "--config", str(bad), "--initial-peers", "m", "--steps", "1"], capsys)
    assert code == 2 and "model.foo: unknown key" in err
    code, err = run(["peer", "--config", str(tmp_path / "missing.toml"), "--initial-peers", "m"], capsys)
    assert code == 2 and "not found" in err


def test_stage_out_of_range_is_a_usage_error(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[model]\nstages = 2\n")
    code, err = run(["peer", "--config", str(cfg), "--initial-peers", "m", "--stage", "5"], capsys)
    assert code == 2 and "--stage 5" in err


def test_every_command_has_help(capsys):
    for command in ("bootstrap", "peer", "train", "status", "demo"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        assert "usage: swarmrt " + command in capsys.readouterr().out


def test_resume_without_a_checkpoint_location_is_a_usage_error(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[model]\nstages = 2\n")
    # an unreachable initial peer: the check must come before the DHT is started
    code, err = run(["peer", "--config", str(cfg), "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--resume"], capsys)
    assert code == 2 and "--resume needs [checkpoint] location" in err and len(err.splitlines()) == 1


def test_status_report_and_text_from_the_dht_records(monkeypatch):
    from swarmrt.discovery.records import StageRecord
    from swarmrt.roles import status

    records = {0: [StageRecord("12D3KooWpeerAAAAAAAAAAAA", 0, "127.0.0.1:5000", 12.5, 1, 7, "serving", 100.0)], 1: []}
    monkeypatch.setattr(status, "read_runs", lambda dht: {"r1": {"stages": 2, "config": "abc"}})
    monkeypatch.setattr(status, "read_stage", lambda dht, run_id, stage: records[stage])
    report = status.read_status(object(), clock=lambda: 102.5)
    assert report["r1"]["config"] == "abc" and report["r1"]["stages"][1] == []
    assert report["r1"]["stages"][0][0]["heartbeat_age_s"] == 2.5 and report["r1"]["stages"][0][0]["version"] == 7
    lines = status.format_status(report)
    assert lines[0] == "run r1 (config abc), 2 stages"
    assert lines[1] == "  stage 0: 1 peer (1 serving), 12.5 samples/s" and lines[3] == "  stage 1: no peers"
    assert "AAAAAAAAAAAA 127.0.0.1:5000" in lines[2] and "serving" in lines[2] and "beat 2.5 s ago" in lines[2]
    assert report["r1"]["balance"]["empty_stages"] == [1] and report["r1"]["stage_totals"][0]["throughput"] == 12.5
    assert status.format_status({}) == ["no runs announced in this DHT"]


def join_token(tmp_path):
    """A join token of a new run, as `swarmrt bootstrap` writes it."""
    import time

    from swarmrt.auth.token import issue_token, load_or_create_run_key

    path = tmp_path / "join-token"
    issue_token(load_or_create_run_key(None), time.time()).save(path)
    return path


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_trainer_that_gives_up_on_a_stage_prints_one_line_and_exits_3(command, tmp_path, monkeypatch, capsys):
    from swarmrt.cli.main import EXIT_NO_PEERS
    from swarmrt.discovery import dht
    from swarmrt.roles import trainer

    class FakeDHT:  # never started as a process: stop_dht has nothing to kill
        pid = None

        def is_alive(self):
            return False

        def shutdown(self):
            pass

    class GivingUp:
        def __init__(self, *args, **kwargs):
            self.say = kwargs["say"]

        async def run(self, *args, **kwargs):
            self.say("trainer: waiting for stage 1 (no peer serves it and no peer elsewhere can move there: ...)")
            raise trainer.NoPeers("stage 1 has no peer and no peer elsewhere can move there (no peer is announced; "
                                  "waited 0.1 s); start a peer with --stage 1")

        evaluate = run

    monkeypatch.setattr(dht, "start_dht", lambda *args, **kwargs: FakeDHT())
    monkeypatch.setattr(trainer, "Trainer", GivingUp)
    monkeypatch.setenv("SWARMRT_JOIN_TOKEN", str(join_token(tmp_path)))
    cfg = tmp_path / "run.toml"
    cfg.write_text("[model]\nstages = 2\n")
    argv = [command, "--config", str(cfg), "--initial-peers", "m"] + (["--steps", "1"] if command == "train" else [])
    code, err = run(argv, capsys)
    assert code == EXIT_NO_PEERS == 3
    lines = err.splitlines()
    assert lines[-1] == (f"swarmrt {command}: stage 1 has no peer and no peer elsewhere can move there (no peer is "
                         "announced; waited 0.1 s); start a peer with --stage 1")
    assert len(lines) == 2 and lines[0].startswith("trainer: waiting for stage 1") and "Traceback" not in err


def test_train_help_names_the_no_peers_exit_status(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "exit status 3" in " ".join(capsys.readouterr().out.split())
