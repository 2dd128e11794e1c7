"""The dldkd CLI: every subcommand explains itself; config errors are messages, not tracebacks."""
import pytest

from launch.cli import build_parser, main

COMMANDS = [["shard"], ["shard", "msssl"], ["shard", "synthetic"], ["validate"], ["train"],
            ["sweep"], ["eval"], ["submit"], ["submit", "train"], ["teacher"],
            ["teacher", "pretrain"], ["teacher", "eval"], ["demo"], ["report"]]


@pytest.mark.parametrize("words", COMMANDS, ids=["-".join(w) for w in COMMANDS])
def test_help(words, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*words, "--help"])
    assert done.value.code == 0
    assert len(capsys.readouterr().out.strip().splitlines()) > 3


def test_submit_takes_overrides_after_the_config():
    args = build_parser().parse_args(["submit", "--address", "http://127.0.0.1:8265", "sweep",
                                      "--config", "configs/sweep-demo.yaml", "optim.lr=1e-4"])
    assert (args.entry, args.config, args.overrides) == (
        "sweep", "configs/sweep-demo.yaml", ["optim.lr=1e-4"])


def test_config_error_is_one_line(capsys):
    code = main(["train", "--no-ray", "--config", "configs/tiny.yaml", "model.hidden=x"])
    err = capsys.readouterr().err
    assert code == 2 and "model.hidden='x' must be an integer" in err and "Traceback" not in err
