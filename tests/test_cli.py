import subprocess

import typer
from typer.testing import CliRunner

from geopix.cli import app
from tests.conftest import geopix_cli


def _command_paths(command, prefix=()):
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*prefix, name))


def test_every_command_has_help():
    root = typer.main.get_command(app)
    paths = list(_command_paths(root))
    assert ("stack", "up") in paths and ("stack", "env") in paths and ("config", "show") in paths
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output, path


def test_console_script_runs():
    out = subprocess.run([*geopix_cli(), "version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.1.0"


def test_config_show_hides_secrets():
    result = CliRunner().invoke(app, ["config", "show", "--set", "stack.s3_secret_access_key=hunter2-xyz"])
    assert result.exit_code == 0, result.output
    assert "hunter2-xyz" not in result.output and "config hash" in result.output


def test_bad_config_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["config", "show", "--config", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2
    assert "none.yaml does not exist" in result.output


def test_commands_on_a_stack_that_never_ran(tmp_path):
    for cmd in (["status"], ["env"], ["down"]):
        result = CliRunner().invoke(app, ["stack", *cmd, "--state-dir", str(tmp_path)])
        assert result.exit_code == 2, (cmd, result.output)
        assert "no stack has been started" in result.output
