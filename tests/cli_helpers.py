"""Run the real `pipeline` command line in a subprocess (real exit codes, stderr, signals)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def pipeline_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *map(str, args)]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(pipeline_cmd(*args), capture_output=True, text=True, timeout=timeout, env=cli_env())


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """A user error: non-zero exit, no traceback, one line on stderr containing every needle."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def collected_store(folder, name: str, *collect_args) -> str:
    """A store recorded by ``pipeline collect --out folder/name *collect_args --quiet``; asserts it worked."""
    out = os.path.join(str(folder), name)
    result = run_cli("collect", "--out", out, *collect_args, "--quiet")
    assert result.returncode == 0, result.stderr
    return out
