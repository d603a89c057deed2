"""Run the imgsent command line with one function paused at its K-th call, so that fault-injection tests act on an
event instead of a sleep (issue #33: their verdicts depended on how fast the machine was):

    python tests/pause.py MODULE:NAME K MARKER imgsent-arguments...

At the K-th call of MODULE.NAME the process writes its PID to MARKER and waits while MARKER exists: the test then
kills it, signals it, or removes MARKER to let it go on. Nothing of this lives in the product's code.
"""
import importlib
import os
import sys
import time
from pathlib import Path


def pause_at(target: str, k: int, marker: Path) -> None:
    module, name = target.split(":")
    mod = importlib.import_module(module)
    real, calls = getattr(mod, name), [0]

    def paused(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            marker.write_text(str(os.getpid()))
            while marker.exists():
                time.sleep(0.01)
        return real(*args, **kwargs)
    setattr(mod, name, paused)


def start(target: str, k: int, marker: Path, *args: str, env: dict | None = None):
    """The command line, paused as above, as a subprocess (stdout and stderr piped, text)."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), target, str(k), str(marker), *args],
                            env={**os.environ, "PYTHONPATH": str(root), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(marker: Path, p, timeout: float = 300) -> bool:
    """True once the paused process has written MARKER; False if it ended first. The timeout only keeps a broken
    run from hanging the suite: a verdict never rests on it."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if p.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise AssertionError(f"{marker}: the run neither paused nor ended in {timeout} s")
        time.sleep(0.01)
    return True


if __name__ == "__main__":
    target, k, marker, *rest = sys.argv[1:]
    pause_at(target, int(k), Path(marker))
    sys.argv = ["imgsent", *rest]
    from pipeline.cli import main
    main()
