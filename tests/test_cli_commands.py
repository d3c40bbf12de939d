"""The command list: `tether --help` names every command with its own help line, and shows
it without importing torch or any command's module (they load when their command runs)."""

import inspect
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tether.cli import COMMANDS, app, load_command

runner = CliRunner()


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_listed_help_line_is_the_commands_own(name):
    command = load_command(name)
    assert command.name == name
    first_paragraph = inspect.cleandoc(command.help or "").split("\n\n")[0]
    assert COMMANDS[name] == first_paragraph


def test_help_lists_every_command_without_loading_one():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from tether.cli import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(result.output)\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('tether.cli.'))\n"
        "print('loaded:', loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert "loaded: []" in out
    for name in COMMANDS:
        assert f" {name} " in out


def test_a_command_runs_after_the_listing_and_a_typo_is_suggested():
    assert runner.invoke(app, ["models", "--json"]).exit_code == 0
    result = runner.invoke(app, ["evl"])
    assert result.exit_code == 2 and "Did you mean 'eval'?" in result.output


@pytest.mark.parametrize("argv,code", [(["models", "--json"], 0), (["evl"], 2)])
def test_a_command_ends_its_process_group_and_an_error_leaves_it_to_the_launcher(
    argv, code, tmp_path, monkeypatch
):
    """A process that exits with a live gloo group can abort during interpreter teardown
    (tether.distributed.shutdown); a failed one leaves the group for the launcher to stop."""
    import torch.distributed as dist

    from tether.cli import main

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    monkeypatch.setattr(sys, "argv", ["tether", *argv])
    try:
        with pytest.raises(SystemExit) as end:
            main()
        assert end.value.code == code
        assert dist.is_initialized() == (code != 0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
