import pytest

from benchmark.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("pretrain", "finetune", "evaluate", "reproduce", "grid", "runs", "status", "collect", "cancel"):
        assert cmd in out


def test_unknown_method_is_a_clear_error(isolated, capsys):
    assert main(["pretrain", "--method", "mocov9"]) == 2
    assert "unknown method 'mocov9'" in capsys.readouterr().err


def test_unknown_config_key_names_it(isolated, capsys):
    assert main(["reproduce", "--table", "soco_table1", "--dry-run", "--set", "method.queue_sise=3"]) == 2
    assert "method.queue_sise" in capsys.readouterr().err


def test_unknown_table(isolated, capsys):
    assert main(["reproduce", "--table", "nope_table"]) == 2
    err = capsys.readouterr().err
    assert "unknown 'nope_table'" in err and "soco_table1" in err


def test_dry_run_lists_the_plan(isolated, capsys):
    assert main(["reproduce", "--table", "soco_table1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    from benchmark.experiments.plan import plan_table
    n = len(plan_table("soco_table1").jobs)      # grows as methods register (PixPro: 29 -> 34)
    assert f"{n} runs, {n} to run" in out and "soco_table1/MoCo v2/seed0/pretrain" in out


def test_runs_lists_the_store(isolated, capsys):
    from benchmark.runs.store import RunStore
    s = RunStore()
    s.begin("abc123", {"stage": "pretrain", "label": "x/y"})
    assert main(["runs"]) == 0
    out = capsys.readouterr().out
    assert "abc123" in out and "interrupted" in out and "1 runs" in out   # begun, and no process holds it
