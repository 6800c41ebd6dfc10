"""The background-process launcher: events from JSON lines, cancel with a grace period that
ends in killing the whole process tree, and a real `train` run cancelled to a resumable
checkpoint."""
from __future__ import annotations

import os
import sys
import textwrap
import time

import numpy as np
import pytest

from EmphysemaUADLib.process import (STOP_FILE_ENV, BackgroundProcess, cli_command, detect_args,
                                     python_executable)

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and groups")


def script(tmp_path, body: str) -> list[str]:
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def collect(process: BackgroundProcess, until=None, timeout=60.0) -> list[dict]:
    """Poll like the GUI's timer does, until `until(event)` or the process has finished."""
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = process.poll()
        events += new
        if until and any(until(e) for e in new):
            return events
        if process.finished:
            return events + process.poll()
        time.sleep(0.02)
    raise AssertionError(f"timed out; events so far: {events[-5:]}")


def test_json_lines_become_events_and_other_output_log_lines(tmp_path):
    process = BackgroundProcess(script(tmp_path, """
        import json, sys
        print(json.dumps({"event": "start", "total": 3}))
        print("plain text")
        print("a warning", file=sys.stderr)
        for i in range(1, 4):
            print(json.dumps({"event": "step", "step": i, "total": 3}), flush=True)
        print(json.dumps({"event": "done"}))
        sys.exit(0)
    """)).start()
    started = time.monotonic()
    process.poll()  # never waits for the worker
    assert time.monotonic() - started < 0.5
    events = collect(process)
    assert process.returncode == 0
    names = [e["event"] for e in events if e.get("level") != "stderr"]
    assert names == ["start", "log", "step", "step", "step", "done"]
    assert {"event": "log", "message": "a warning", "level": "stderr"} in events
    assert list(process.stderr_tail) == ["a warning"]
    assert process.last_error is None


def test_the_last_error_event_is_kept_for_the_message_box(tmp_path):
    process = BackgroundProcess(script(tmp_path, """
        import json
        print(json.dumps({"event": "error", "message": "no lung found; is this a chest CT?"}))
        raise SystemExit(2)
    """)).start()
    collect(process)
    assert process.returncode == 2
    assert process.last_error == "no lung found; is this a chest CT?"


def test_inside_slicer_the_worker_runs_under_pythonslicer(tmp_path, monkeypatch):
    """In Slicer sys.executable is the application; its PythonSlicer launcher (on PATH in
    Slicer) runs the worker with Slicer's Python environment."""
    assert python_executable() == sys.executable  # a plain Python runs its own workers
    app = tmp_path / "Slicer-5.8" / "bin"
    app.mkdir(parents=True)
    (app / "SlicerApp-real").write_text("")
    launcher = tmp_path / "on-path" / "PythonSlicer"
    launcher.parent.mkdir()
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(app / "SlicerApp-real"))
    monkeypatch.setenv("PATH", str(launcher.parent))
    assert python_executable() == str(launcher)
    assert cli_command(["--version"])[:3] == [str(launcher), "-m", "EmphysemaUADLib"]
    # not on PATH: the one beside the application
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    (app / "PythonSlicer").write_text("")
    assert python_executable() == str(app / "PythonSlicer")


def test_detect_arguments():
    assert detect_args("/t/ct.nrrd", "/t/out", None, None, None, "cpu") == \
        ["detect", "/t/ct.nrrd", "--output-dir", "/t/out", "--device", "cpu"]
    args = detect_args("/t/ct.nrrd", "/t/out", "/t/lobes.nrrd", "/m/best.pt", 0.4)
    assert args[args.index("--lobes") + 1] == "/t/lobes.nrrd"
    assert args[args.index("--model") + 1] == "/m/best.pt"
    assert args[args.index("--threshold") + 1] == "0.4"
    assert args[args.index("--device") + 1] == "auto"
    assert "--no-correct-hu" not in args  # a shifted scale is corrected by default
    assert detect_args("/t/ct.nrrd", "/t/out", correct_hu=False)[-1] == "--no-correct-hu"


def test_worker_imports_the_library_from_any_folder(tmp_path):
    process = BackgroundProcess(cli_command(["--version"]), cwd=tmp_path).start()
    events = collect(process)
    assert process.returncode == 0
    assert any("emphysema-uad" in e.get("message", "") for e in events)


@posix_only
def test_cancel_lets_the_process_save_then_exit(tmp_path):
    process = BackgroundProcess(script(tmp_path, f"""
        import json, pathlib, signal, sys, time
        def stop(*_):
            pathlib.Path({str(tmp_path / 'saved')!r}).write_text("ok")
            sys.exit(130)
        signal.signal(signal.SIGINT, stop)
        print(json.dumps({{"event": "start"}}), flush=True)
        time.sleep(60)
    """), grace_s=20).start()
    collect(process, until=lambda e: e["event"] == "start")
    process.cancel()
    assert process.wait(timeout=20) == 130
    assert (tmp_path / "saved").read_text() == "ok"
    assert process.cancelled


def test_cancel_without_signals_uses_the_stop_file(tmp_path):
    """Windows' path (no SIGINT for a GUI's workers), taken here with signals turned off: the
    worker sees the stop file, saves and exits; the file is gone afterwards."""
    process = BackgroundProcess(script(tmp_path, f"""
        import json, pathlib, signal, sys, time
        from EmphysemaUADLib.process import stop_requested
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the file can stop it
        print(json.dumps({{"event": "start"}}), flush=True)
        for _ in range(1200):
            if stop_requested():
                pathlib.Path({str(tmp_path / 'saved')!r}).write_text("ok")
                sys.exit(130)
            time.sleep(0.05)
        sys.exit(3)
    """), grace_s=30)
    process.use_signals = False
    assert process.env[STOP_FILE_ENV] == str(process.stop_file)
    process.start()
    collect(process, until=lambda e: e["event"] == "start")
    assert not process.stop_file.exists()
    process.cancel()
    assert process.wait(timeout=20) == 130
    assert (tmp_path / "saved").read_text() == "ok"
    assert not process.stop_file.exists()


@posix_only
def test_cancel_kills_the_whole_tree_after_the_grace_period(tmp_path):
    pid_file = tmp_path / "child.pid"
    process = BackgroundProcess(script(tmp_path, f"""
        import json, signal, subprocess, sys, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a worker that does not listen
        child = subprocess.Popen([sys.executable, "-c",
                                  "import signal, time; signal.signal(signal.SIGINT, "
                                  "signal.SIG_IGN); time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print(json.dumps({{"event": "start"}}), flush=True)
        time.sleep(120)
    """), grace_s=0.5).start()
    collect(process, until=lambda e: e["event"] == "start")
    child = int(pid_file.read_text())
    process.cancel()
    time.sleep(0.2)
    assert process.running  # SIGINT ignored: still there within the grace period
    started = time.monotonic()
    while process.running and time.monotonic() - started < 10:
        process.poll()  # the GUI timer: kills once the grace period is over
        time.sleep(0.05)
    assert process.returncode == -9
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the worker's child survived the cancel"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed child not yet reaped by its (dead) parent is a zombie: count it as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


@pytest.fixture
def healthy_cases(tmp_path):
    from EmphysemaUADLib.phantom import make_phantom
    from EmphysemaUADLib.volume_io import write_volume

    folder = tmp_path / "healthy"
    for seed in (1, 2):
        phantom = make_phantom(seed, shape=(16, 64, 64), spacing=(5.0, 5.0, 5.0),
                               emphysema="none")
        write_volume(phantom.ct.array, phantom.ct.geometry, folder / f"case{seed}.nii.gz")
    return folder


@pytest.mark.slow  # about 40 s on 2 cores: two short trainings
@posix_only
def test_training_in_the_background_cancels_to_a_resumable_checkpoint(tmp_path,
                                                                      healthy_cases):
    from EmphysemaUADLib.checkpoint import load_checkpoint

    out = tmp_path / "model"
    process = BackgroundProcess.cli(
        ["train", healthy_cases, "--output", out, "--epochs", 1000, "--width", 4,
         "--batch-size", 2, "--size", 64, "--device", "cpu"], grace_s=60).start()
    events = collect(process, until=lambda e: e["event"] in ("step", "error"),
                     timeout=120)
    assert not [e for e in events if e["event"] == "error"], events
    assert any(e["event"] == "step" and "eta_s" in e for e in events)
    process.cancel()
    code = process.wait(timeout=90)
    events += process.poll()
    assert code == 130, list(process.stderr_tail)[-10:]
    last = out / "last.pt"
    assert last.is_file()
    assert load_checkpoint(last).training_state  # optimiser state etc.: resumable
    assert any(e["event"] == "interrupted" for e in events)

    stopped_at = max(e["step"] for e in events if e["event"] == "step")

    # resumed, then cancelled the way Windows does it: the stop file only, no signal
    resumed = BackgroundProcess.cli(
        ["train", healthy_cases, "--output", out, "--epochs", 1000, "--width", 4,
         "--batch-size", 2, "--size", 64, "--device", "cpu", "--resume"], grace_s=60)
    resumed.use_signals = False
    resumed.start()
    more = collect(resumed, until=lambda e: e["event"] in ("step", "error"), timeout=120)
    saved_before = last.stat().st_mtime_ns
    resumed.cancel()
    assert resumed.wait(timeout=90) == 130, list(resumed.stderr_tail)[-10:]
    more += resumed.poll()
    assert any(e["event"] == "interrupted" for e in more)
    assert last.stat().st_mtime_ns > saved_before  # saved again at the stop
    assert not [e for e in more if e["event"] == "error"], more
    steps = [e for e in more if e["event"] == "step"]
    assert steps[0]["step"] > stopped_at  # goes on from the checkpoint, not from the start
    assert np.isfinite([e["loss"] for e in steps]).all()
