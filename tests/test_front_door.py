"""What a newcomer meets first: README's two commands as CI reads them, shipped profiles that no
folder in the working directory can shadow, and light commands that start without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from shnet.cli import LAZY_COMMANDS, lazy_short_help, load_command, main
from shnet.errors import ShnetError
from shnet.pipeline.profiles import load_profile, profile_names

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "distributed", "matplotlib")


def readme_command(n: int) -> str:
    return subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_command.py"), str(n)], check=True, capture_output=True, text=True).stdout.strip()


def test_readme_commands_as_ci_reads_them():
    first, second = readme_command(1), readme_command(2)
    assert "pip install -c constraints.txt -e . " in first and "[test]" not in first, first
    assert first.endswith("shnet demo -o demo"), first
    assert '-e ".[test]"' in second and second.endswith("python -m pytest -q"), second
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command.py 1" in ci and "readme_command.py 2" in ci and "check_demo.py" in ci


def test_ci_demo_check_refuses_metrics_at_chance(tmp_path):
    from shnet.demo.metrics_table import chance_metrics

    chance = chance_metrics(30)
    good = {"r1": 40.0, "r5": 80.0, "r10": 90.0}
    metrics = {"chance": chance, "n_test_images": 30}
    metrics |= {m: {"full": {"i2t": good, "t2i": good, "rsum": 500.0}} for m in ("region", "grid", "hybrid")}
    (tmp_path / "report.html").write_text("<html></html>")
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    check = [sys.executable, str(ROOT / ".ci" / "check_demo.py"), str(tmp_path)]
    assert subprocess.run(check, capture_output=True, text=True).returncode == 0
    metrics["grid"]["full"] = chance
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    failed = subprocess.run(check, capture_output=True, text=True)
    assert failed.returncode == 1 and "grid rSum" in failed.stderr
    (tmp_path / "report.html").unlink()
    assert "report.html" in subprocess.run(check, capture_output=True, text=True).stderr


def test_shipped_profiles_win_over_folders_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in profile_names():
        (tmp_path / name).mkdir()
        (tmp_path / f"{name}.yaml").write_text("stages: {grid: {model: not-shipped}}\n")
    for name in profile_names():
        assert load_profile(name)["name"] == name
    assert load_profile("./smoke.yaml")["stages"] == {"grid": {"model": "not-shipped"}}
    assert load_profile(str(tmp_path / "demo.yaml"))["stages"]["grid"]["model"] == "not-shipped"


def test_unknown_profile_names_what_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShnetError) as bare:
        load_profile("smok")
    assert "no shipped profile" in str(bare.value) and all(name in str(bare.value) for name in profile_names())
    with pytest.raises(ShnetError) as path:
        load_profile("profiles/mine.yaml")
    assert "profile file not found" in str(path.value) and "mine.yaml" in str(path.value) and "smoke" in str(path.value)
    with pytest.raises(ShnetError, match="not found"):
        load_profile("mine.yml")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ShnetError, match="not found"):
        load_profile("sub/")


def test_extract_in_a_folder_named_like_the_profile(tmp_path):
    (tmp_path / "smoke").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "shnet", "extract", "--sample", "--profile", "smoke", "--stages", "saliency", "-o", "smoke", "--scheduler", "in-process"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "smoke" / "saliency" / "00000.done").is_file()


@pytest.mark.parametrize("target", sorted(LAZY_COMMANDS.values()))
def test_lazy_commands_list_the_help_they_have_when_loaded(target):
    assert lazy_short_help(target) == load_command(target).get_short_help_str(45)
    assert lazy_short_help(target, 80) == load_command(target).get_short_help_str(80)


def test_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in LAZY_COMMANDS:
        assert f"  {name} " in result.output
    context = click.Context(main)
    assert all(main.get_command(context, name) is not None for name in main.list_commands(context))


def _modules_after(args: list[str], cwd: Path) -> list[str]:
    probe = (
        "import sys\nfrom shnet.cli import main\n"
        "try:\n    main(sys.argv[1:], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe, *args], cwd=cwd, capture_output=True, text=True, check=True).stdout
    return [m for m in out.rsplit("HEAVY=", 1)[1].strip().split(",") if m]


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("front")
    subprocess.run(
        [sys.executable, "-m", "shnet", "extract", "--sample", "--profile", "smoke", "--stages", "saliency", "-o", "cache", "--scheduler", "in-process"],
        cwd=root, check=True, capture_output=True,
    )
    return root


@pytest.mark.parametrize("args", [["--help"], ["inspect", "--help"], ["verify", "cache"], ["inspect", "cache"], ["inspect", "cache", "--errors"], ["train", "--help"], ["demo", "--help"], ["evaluate", "--help"]])
def test_light_commands_start_without_torch(small_cache, args):
    assert _modules_after(args, small_cache) == []


def test_a_grid_extract_with_random_weights_leaves_torch_to_its_workers(tmp_path):
    """The extract's own process checks a known architecture with random weights by name: torch (1-2 s
    to import) is imported by the workers only, not on the same cores as they start."""
    args = ["extract", "--sample", "-o", "cache", "--stages", "grid", "--workers", "1",
            "--set", "grid.model=resnet18", "--set", "grid.weights=random", "--set", "grid.input_size=64"]
    assert _modules_after(args, tmp_path) == ["distributed"]
    assert list((tmp_path / "cache" / "grid").glob("*.done"))


def test_import_of_the_cli_is_torch_free():
    out = subprocess.run([sys.executable, "-c", "import sys, shnet.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'distributed', 'matplotlib', 'dask')))"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_command_leaves_what_is_alive_at_exit_out_of_the_last_collections(small_cache):
    """After a command, everything still alive is frozen out of the interpreter's exit collections
    (with torch and Dask loaded they took a second after the command's last line)."""
    probe = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen at exit', gc.get_freeze_count() > 1000, flush=True))\n"
        "from shnet.cli import main\n"
        "main(['inspect', 'cache'])\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=small_cache, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1] == "frozen at exit True"


def test_inspect_fits_an_80_column_terminal(small_cache):
    env = dict(os.environ, COLUMNS="80")
    out = subprocess.run([sys.executable, "-m", "shnet", "inspect", "cache"], cwd=small_cache, env=env, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert any("saliency 64x64 float16" in line for line in lines)
    assert any(line.startswith("saliency: backend=spectral_residual") for line in lines)
    assert not any("…" in line for line in lines), out


def test_error_lines_escape_control_characters(tmp_path):
    result = CliRunner().invoke(main, ["extract", "--sample", "--profile", "\x1b[2Jred\x07", "-o", str(tmp_path / "c")])
    assert result.exit_code == 1
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "\\x1b[2Jred\\x07" in result.output and "unknown profile" in result.output
