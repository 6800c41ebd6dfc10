"""A background `python -m EmphysemaUADLib ... --progress json` process, followed without Qt.

The GUI (or any caller) starts it, then calls `poll()` from a timer: reader threads have
queued the process's stdout JSON lines as events and its stderr as log lines, so polling
never blocks. `cancel()` asks politely first (SIGINT, so training saves a resumable
last.pt), and `poll()` kills the whole process group once the grace period is over: the
workers the process started die with it.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # folder holding EmphysemaUADLib
CANCEL_GRACE_S = 30.0
_WINDOWS = sys.platform == "win32"


def python_executable() -> str:
    """The interpreter for worker processes. Inside Slicer `sys.executable` is the Slicer
    application itself; its PythonSlicer launcher (beside it) runs plain Python."""
    exe = Path(sys.executable)
    if exe.stem.lower() in ("slicer", "slicerapp-real"):
        for candidate in (exe.with_name("PythonSlicer"), exe.with_name("PythonSlicer.exe"),
                          exe.parent.parent / "bin" / "PythonSlicer",
                          exe.parent.parent / "bin" / "PythonSlicer.exe"):
            if candidate.is_file():
                return str(candidate)
    return sys.executable


def cli_command(args: list[str], python: str | None = None) -> list[str]:
    """Command line running an `emphysema-uad` subcommand with JSON progress."""
    return [python or python_executable(), "-m", "EmphysemaUADLib", *map(str, args),
            "--progress", "json"]


class BackgroundProcess:
    """One worker process: start, poll its events, cancel it (process tree included)."""

    def __init__(self, command: list[str], cwd: str | os.PathLike | None = None,
                 env: dict | None = None, grace_s: float = CANCEL_GRACE_S):
        self.command = [str(c) for c in command]
        self.cwd = cwd
        self.env = dict(os.environ if env is None else env)
        # the worker imports the library from where this file is, whatever its cwd
        path = self.env.get("PYTHONPATH")
        self.env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT)] + ([path] if path else []))
        self.env["PYTHONUNBUFFERED"] = "1"
        self.grace_s = grace_s
        self.process: subprocess.Popen | None = None
        self.events: queue.Queue = queue.Queue()
        self.stderr_tail: deque[str] = deque(maxlen=200)
        self.cancelled = False
        self._kill_at: float | None = None
        self._readers: list[threading.Thread] = []

    @classmethod
    def cli(cls, args: list[str], python: str | None = None, **kwargs) -> "BackgroundProcess":
        return cls(cli_command(args, python), **kwargs)

    def start(self) -> "BackgroundProcess":
        group = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if _WINDOWS
                 else {"start_new_session": True})
        self.process = subprocess.Popen(
            self.command, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
            errors="replace", bufsize=1, **group)
        for stream, parse in ((self.process.stdout, _parse_stdout),
                              (self.process.stderr, self._parse_stderr)):
            reader = threading.Thread(target=self._read, args=(stream, parse), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def _read(self, stream, parse) -> None:
        for line in stream:
            line = line.rstrip("\r\n")
            if line:
                self.events.put(parse(line))
        stream.close()

    def _parse_stderr(self, line: str) -> dict:
        self.stderr_tail.append(line)
        return {"event": "log", "message": line, "level": "stderr"}

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def finished(self) -> bool:
        """Exited, and every line it wrote has been read."""
        return (self.process is not None and self.process.poll() is not None
                and not any(r.is_alive() for r in self._readers))

    def poll(self) -> list[dict]:
        """Events since the last call (never blocks); kills the tree once a cancel's grace
        period is over."""
        if self._kill_at is not None and time.monotonic() >= self._kill_at and self.running:
            self.kill()
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def cancel(self, grace_s: float | None = None) -> None:
        """Ask the process to stop (it saves what it can); `poll()` or `wait()` kill the
        whole tree when it has not gone after the grace period."""
        if not self.running:
            return
        self.cancelled = True
        self._kill_at = time.monotonic() + (self.grace_s if grace_s is None else grace_s)
        if _WINDOWS:
            self.process.send_signal(signal.CTRL_BREAK_EVENT)
        else:
            _signal_group(self.process.pid, signal.SIGINT)

    def kill(self) -> None:
        """Kill the process and every process it started."""
        if self.process is None or self.process.poll() is not None:
            return
        if _WINDOWS:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)],
                           capture_output=True, check=False)
        else:
            _signal_group(self.process.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the process ends (for scripts and tests; a GUI polls instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            if self._kill_at is not None and time.monotonic() >= self._kill_at:
                self.kill()
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
        for reader in self._readers:
            reader.join(timeout=5)
        return self.returncode


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(os.getpgid(pid), sig)
    except ProcessLookupError:
        pass


def _parse_stdout(line: str) -> dict:
    """A JSON progress line as its event; any other output as a log line."""
    try:
        event = json.loads(line)
    except ValueError:
        return {"event": "log", "message": line, "level": "stdout"}
    if not isinstance(event, dict) or "event" not in event:
        return {"event": "log", "message": line, "level": "stdout"}
    return event
