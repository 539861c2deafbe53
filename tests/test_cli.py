"""The command line: `python -m bilevel check` runs every method and reports success."""

import subprocess
import sys


def test_check_command_runs_every_method_and_passes():
    out = subprocess.run([sys.executable, "-m", "bilevel", "check", "--dim", "5", "--steps", "300"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for name in ("unroll", "truncate(last=50)", "forward_mode", "implicit(cg)", "implicit(identity)"):
        assert f"\n{name}" in out.stdout, name
    assert "OK: worst error of the exact methods" in out.stdout


def test_check_help():
    out = subprocess.run([sys.executable, "-m", "bilevel", "check", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--steps" in out.stdout
