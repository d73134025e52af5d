"""Run the real `pipeline` command line in a subprocess (real exit codes, stderr, signals)."""

import os
import signal
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


def _let_children_see_ctrl_c() -> None:
    # A shell hands SIG_IGN for SIGINT to what it starts in the background (`nohup pytest &`), an
    # ignored signal stays ignored across exec, and Python leaves an ignored SIGINT ignored: the
    # child would never see the Ctrl-C a test sends. A handled signal is reset to its default at
    # exec, so handling it here gives children the default (no preexec_fn, which threads make unsafe).
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def start_cli(*args: str, new_session: bool = False) -> subprocess.Popen:
    """``pipeline *args`` running in the background, stdout and stderr piped, for signal tests."""
    _let_children_see_ctrl_c()
    return subprocess.Popen(pipeline_cmd(*args), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=new_session)


def finish_cli(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """Wait for a started command's (stdout, stderr); one still running after ``timeout`` is killed,
    so that a failing test leaves nothing behind."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # what it started goes with it (the store's writer process: PR_SET_PDEATHSIG)
        _, err = proc.communicate()
        raise AssertionError(f"`{' '.join(proc.args[2:])}` still ran {timeout:.0f} s after the signal:\n{err}")


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
