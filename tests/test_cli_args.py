"""`pgzoo` command lines: a command's flags and key=value overrides in any order."""

import pytest

from pgzoo.cli.main import main, parse


@pytest.mark.parametrize("argv", [
    ["train", "tiny/minirl", "--dry-run", "train.steps=3", "rollout.engine=transformers"],
    ["train", "--dry-run", "tiny/minirl", "train.steps=3", "rollout.engine=transformers"],
    ["train", "tiny/minirl", "train.steps=3", "--dry-run", "rollout.engine=transformers"],
    ["train", "tiny/minirl", "train.steps=3", "rollout.engine=transformers", "--dry-run"],
])
def test_flags_and_overrides_in_any_order(argv):
    args = parse(argv)
    assert args.recipe == "tiny/minirl" and args.dry_run
    assert args.overrides == ["train.steps=3", "rollout.engine=transformers"]


def test_dry_run_with_trailing_overrides_runs(capsys):
    assert main(["train", "tiny/minirl", "--dry-run", "train.steps=3", "rollout.engine=transformers"]) == 0
    out = capsys.readouterr().out
    assert "3 global steps" in out and "transformers" in out


def test_nested_actions_still_parse():
    args = parse(["recipe", "list", "tiny/*"])
    assert args.command == "recipe" and args.recipe_command == "list" and args.pattern == "tiny/*"


def test_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["train", "tiny/minirl", "--no-such-flag"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
