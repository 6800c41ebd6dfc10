"""A background `python -m EmphysemaUADLib ... --progress json` process, followed without Qt.

The GUI (or any caller) starts it, then calls `poll()` from a timer: reader threads have
queued the process's stdout JSON lines as events and its stderr as log lines, so polling
never blocks. `cancel()` asks politely first, and `poll()` kills the whole process tree once
the grace period is over: the workers the process started die with it.

Asking politely is a stop file on every platform (its path is in the worker's environment as
EMPHYSEMA_UAD_STOP_FILE; training checks it after every step, saves a resumable last.pt and
exits 130) plus, on POSIX, SIGINT to the process group. Windows has no SIGINT to send: a
console control event cannot reach a worker of a GUI application such as Slicer, which has no
console to share. Killing the tree needs no psutil (not bundled with Slicer): a POSIX process
group (start_new_session) or `taskkill /T` on Windows.
"""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # folder holding EmphysemaUADLib
CANCEL_GRACE_S = 30.0
STOP_FILE_ENV = "EMPHYSEMA_UAD_STOP_FILE"
_WINDOWS = sys.platform == "win32"


def python_executable() -> str:
    """The interpreter for worker processes: this one, unless it is not a plain Python. Inside
    Slicer `sys.executable` is the application (SlicerApp-real); there the worker runs under
    PythonSlicer, the launcher that sets up Slicer's Python environment (Slicer puts it on
    PATH, as `slicer.util.pip_install` relies on)."""
    exe = Path(sys.executable)
    if exe.name.lower().startswith("python"):
        return sys.executable
    found = shutil.which("PythonSlicer")
    if found:
        return found
    for folder in (exe.parent, exe.parent.parent / "bin"):
        for name in ("PythonSlicer", "PythonSlicer.exe"):
            if (folder / name).is_file():
                return str(folder / name)
    return sys.executable


def stop_requested() -> bool:
    """True in a worker whose launcher asked it to stop (see `BackgroundProcess.cancel`)."""
    path = os.environ.get(STOP_FILE_ENV)
    return bool(path) and os.path.exists(path)


def cli_command(args: list[str], python: str | None = None) -> list[str]:
    """Command line running an `emphysema-uad` subcommand with JSON progress."""
    return [python or python_executable(), "-m", "EmphysemaUADLib", *map(str, args),
            "--progress", "json"]


# The worker's arguments and where it writes are built here only, for the GUI and its tests.
def detect_args(ct, output_dir, lobes=None, model=None, threshold=None,
                device: str = "auto", correct_hu: bool = True) -> list[str]:
    """Arguments of `emphysema-uad detect` for one CT file (the case folder in `output_dir`
    is named after the file: `detect_case_dir`). `threshold` None: the model's own."""
    args = ["detect", str(ct), "--output-dir", str(output_dir), "--device", device]
    args += ["--lobes", str(lobes)] if lobes else []
    args += ["--model", str(model)] if model else []
    args += ["--threshold", str(threshold)] if threshold is not None else []
    args += [] if correct_hu else ["--no-correct-hu"]
    return args


def detect_case_dir(ct, output_dir) -> Path:
    """The folder `detect` writes the case of the CT file `ct` to."""
    from .volume_io import case_name

    return Path(output_dir) / case_name(Path(ct))


def train_args(data, output, epochs: int, width: int, batch_size: int, device: str = "auto",
               resume: bool = False, init_from: str | None = None) -> list[str]:
    """Arguments of `emphysema-uad train`; `init_from` ("bundled" or a checkpoint) fine-tunes
    that model (a resumed run already holds its start)."""
    args = ["train", str(data), "--output", str(output), "--epochs", str(int(epochs)),
            "--width", str(int(width)), "--batch-size", str(int(batch_size)),
            "--device", device]
    if init_from and not resume:
        args += ["--init-from", str(init_from)]
    return args + (["--resume"] if resume else [])


SITE_MODEL_NAME = "site_model.pt"  # what the panel names the copy with a site's threshold


def site_threshold_args(healthy, output, model=None, device: str = "auto",
                        correct_hu: bool = True) -> list[str]:
    """Arguments of `emphysema-uad site-threshold`: a copy of `model` (None: the bundled
    one) at `output` whose threshold is set from the healthy CTs in `healthy` (on their
    corrected HU scale with `correct_hu`, as stored without)."""
    args = ["site-threshold", str(healthy), "--output", str(output), "--device", device]
    return args + (["--model", str(model)] if model else []) + (
        [] if correct_hu else ["--no-correct-hu"])


def training_outputs(output) -> tuple[Path, Path]:
    """(last.pt: the run to resume, best.pt: the model to use) in a training's folder."""
    return Path(output) / "last.pt", Path(output) / "best.pt"


# --- the worker's environment, checked without importing torch ------------------------------
def parse_requirements(text: str) -> list[tuple[str, str | None]]:
    """(distribution name, minimum version or None) of each `name>=version` line of a
    requirements file; comments and blank lines are skipped."""
    found = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:>=\s*([0-9][0-9.]*))?", line)
        if not match:
            raise ValueError(f"requirement {line!r}: only 'name' or 'name>=version' is "
                             "supported")
        found.append((match.group(1), match.group(2)))
    return found


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text.split("+")[0])[:3])


def missing_requirements(text: str) -> list[str]:
    """The requirements of a requirements file that this Python lacks or has too old."""
    from importlib.metadata import PackageNotFoundError, version

    missing = []
    for name, minimum in parse_requirements(text):
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed is None or (minimum and _version_tuple(installed) < _version_tuple(minimum)):
            missing.append(f"{name}>={minimum}" if minimum else name)
    return missing


PROBE_CUDA = "import json, torch; print(json.dumps(bool(torch.cuda.is_available())))"


def torch_sees_cuda_in_worker(python: str | None = None, timeout_s: float = 120.0):
    """Whether PyTorch can use CUDA, asked in a separate Python (the worker's) so that the
    caller never imports torch; None when torch is missing or the probe fails."""
    try:
        done = subprocess.run([python or python_executable(), "-c", PROBE_CUDA],
                              capture_output=True, text=True, timeout=timeout_s, check=False,
                              stdin=subprocess.DEVNULL,
                              creationflags=subprocess.CREATE_NO_WINDOW if _WINDOWS else 0)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return None
    try:
        return bool(json.loads(lines[-1]))
    except ValueError:
        return None


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
        # asked to stop through this file (every platform) and SIGINT (POSIX; tests may
        # turn signals off to follow the Windows path)
        self.stop_file = Path(tempfile.gettempdir()) / \
            f"emphysema-uad-stop-{os.getpid()}-{id(self):x}-{time.monotonic_ns()}"
        self.env[STOP_FILE_ENV] = str(self.stop_file)
        self.use_signals = not _WINDOWS
        self.process: subprocess.Popen | None = None
        self.events: queue.Queue = queue.Queue()
        self.stderr_tail: deque[str] = deque(maxlen=200)
        self.last_error: str | None = None  # message of the last "error" event seen
        self.cancelled = False
        self._kill_at: float | None = None
        self._readers: list[threading.Thread] = []

    @classmethod
    def cli(cls, args: list[str], python: str | None = None, **kwargs) -> "BackgroundProcess":
        return cls(cli_command(args, python), **kwargs)

    def start(self) -> "BackgroundProcess":
        # its own process group / session, so that the tree can be signalled and killed
        # together; no console window on Windows
        group = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP
                  | subprocess.CREATE_NO_WINDOW} if _WINDOWS else {"start_new_session": True})
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
        done = (self.process is not None and self.process.poll() is not None
                and not any(r.is_alive() for r in self._readers))
        if done:
            self._remove_stop_file()
        return done

    def _remove_stop_file(self) -> None:
        try:
            self.stop_file.unlink()
        except OSError:
            pass

    def poll(self) -> list[dict]:
        """Events since the last call (never blocks); kills the tree once a cancel's grace
        period is over."""
        if self._kill_at is not None and time.monotonic() >= self._kill_at and self.running:
            self.kill()
        out = []
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return out
            if event.get("event") == "error" and event.get("message"):
                self.last_error = str(event["message"])
            out.append(event)

    def cancel(self, grace_s: float | None = None) -> None:
        """Ask the process to stop (it saves what it can); `poll()` or `wait()` kill the
        whole tree when it has not gone after the grace period."""
        if not self.running:
            return
        self.cancelled = True
        self._kill_at = time.monotonic() + (self.grace_s if grace_s is None else grace_s)
        self.stop_file.write_text("stop\n")
        if self.use_signals:
            _signal_group(self.process.pid, signal.SIGINT)

    def kill(self) -> None:
        """Kill the process and every process it started."""
        if self.process is None or self.process.poll() is not None:
            return
        if _WINDOWS:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)],
                           capture_output=True, check=False,
                           creationflags=subprocess.CREATE_NO_WINDOW)
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
        self._remove_stop_file()
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
