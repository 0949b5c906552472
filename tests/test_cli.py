"""`python -m mmsoup`: a user's mistake is one line and exit status 2; --debug shows the traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mmsoup import cli
from mmsoup.errors import MMSoupError


def _run(argv, capsys):
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_unknown_profile_is_one_line_and_exit_2(capsys):
    status, _, err = _run(["sweep", "--profile", "tiny"], capsys)
    assert status == 2
    assert err.splitlines() == [
        "mmsoup: error: Unknown profile 'tiny'; pick one of embedded, smoke, paper."
    ]


def test_missing_sweep_file_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    status, _, err = _run(["finetune", "--sweep", str(missing), "--run", "1"], capsys)
    assert status == 2
    assert len(err.splitlines()) == 1 and str(missing) in err and "Traceback" not in err


def test_debug_shows_the_traceback():
    # the profile is checked before torch is imported: a real process, started quickly
    cmd = [sys.executable, "-m", "mmsoup", "sweep", "--profile", "tiny", "--debug"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr
    assert "mmsoup.errors.MMSoupError: Unknown profile 'tiny'" in proc.stderr


def test_sweep_then_soup_share_their_default_run_folder(tmp_path, monkeypatch, capsys):
    """`mmsoup sweep` writes runs/<profile>/sweep/, where `mmsoup soup` (and the notebooks) read.

    The default cache is shared with the other end-to-end tests: the smoke backbone is pretrained once.
    """
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sweep", "--profile", "smoke"]) == 0
    sweep = tmp_path / "runs" / "smoke" / "sweep"
    assert (sweep / "sweep.json").is_file()
    assert sorted(p.name for p in sweep.glob("model_*.safetensors")) == [
        f"model_{i}.safetensors" for i in range(5)
    ]
    assert cli.main(["soup", "--profile", "smoke", "--recipe", "Uniform soup"]) == 0
    assert "Uniform soup" in capsys.readouterr().out
    assert (tmp_path / "runs" / "smoke" / "soups" / "uniform_soup.safetensors").is_file()


def test_a_registered_command_is_parsed_and_its_errors_handled(capsys):
    calls = []

    @cli.command("echo-test", "test command", cli.arg("--n", type=int, default=1))
    def echo(args):
        calls.append(args.n)
        if args.n < 0:
            raise MMSoupError("--n must be >= 0; pass a count.")
        if args.n == 0:
            raise KeyboardInterrupt
        return 0

    try:
        assert "echo-test" in cli.build_parser().format_help()
        assert _run(["echo-test", "--n", "3"], capsys)[0] == 0 and calls == [3]
        status, _, err = _run(["echo-test", "--n", "-1"], capsys)
        assert (status, err) == (2, "mmsoup: error: --n must be >= 0; pass a count.\n")
        status, _, err = _run(["echo-test", "--n", "0"], capsys)
        assert (status, err) == (1, "mmsoup: error: interrupted\n")
        with pytest.raises(MMSoupError):
            cli.main(["--debug", "echo-test", "--n", "-1"])
    finally:
        del cli.COMMANDS["echo-test"]


def test_finetune_without_a_run_source_is_a_clear_error(capsys):
    status, _, err = _run(["finetune"], capsys)
    assert status == 2 and "--sweep FILE --run K" in err


def test_profiles_name_the_architectures_of_mmsoup_models():
    from mmsoup import models, profiles

    assert profiles.get_profile("embedded").arch == models.TINY_ARCH
    assert profiles.get_profile("paper").arch == models.PAPER_ARCH
