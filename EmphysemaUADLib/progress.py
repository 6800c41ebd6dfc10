"""Progress for long commands: a bar on a terminal, or one JSON object per stdout line.

JSON mode is what the Slicer module and other GUIs read: every stdout line is an object with
an "event" key (start, epoch, step, validation, checkpoint, log, done, error, ...). In bar mode
everything goes to stderr so stdout stays free for results.

Library functions take a `progress` (default NO_PROGRESS, which shows nothing) and report
through it alone: steps, events and log lines (`progress.log`), never a separate callback.
"""
from __future__ import annotations

import json
import math
import sys
import time


ERROR_EVENTS = ("error", "case_error")
PLAIN_STEP_EVERY_S = 30.0  # a plain progress line (no terminal) at most this often


class Progress:
    """mode: "bar" (a bar on a terminal, plain lines when stderr is redirected), "json" or
    "none". errors_to_stderr: error events and warnings also reach stderr as one line in the
    json and none modes (the command line: errors are never hidden)."""

    def __init__(self, mode: str = "bar", stream=None, errors_to_stderr: bool = False):
        if mode not in ("bar", "json", "none"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self.stream = stream or (sys.stdout if mode == "json" else sys.stderr)
        self.errors_to_stderr = errors_to_stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self._rate_from: tuple[float, int] | None = None
        self._last_bar = 0.0
        self._last_plain: float | None = None
        self._bar_open = False

    def _emit(self, obj: dict) -> None:
        self.stream.write(json.dumps(obj, default=_jsonable) + "\n")
        self.stream.flush()

    def _close_bar(self) -> None:
        if self._bar_open:
            self.stream.write("\n")
            self._bar_open = False

    def event(self, event: str, message: str | None = None, **fields) -> None:
        """A discrete happening; shown as a log line on a terminal."""
        if self.errors_to_stderr and self.mode != "bar" and (
                event in ERROR_EVENTS or fields.get("level") in ("warning", "error")):
            label = "warning" if event == "log" else "error"
            sys.stderr.write(f"emphysema-uad: {label}: {message or fields}\n")
            sys.stderr.flush()
        if self.mode == "json":
            self._emit({"event": event, **({"message": message} if message else {}), **fields})
        elif self.mode == "bar":
            self._close_bar()
            text = message or " ".join(f"{k}={_short(v)}" for k, v in fields.items())
            label = fields["level"] if event == "log" and fields.get("level") in (
                "warning", "error") else event
            self.stream.write(f"[{label}] {text}\n")
            self.stream.flush()

    def log(self, message: str, level: str = "info") -> None:
        self.event("log", message, level=level)

    def eta(self, step: int, total: int) -> float | None:
        """Seconds left, from the rate since the first step reported (start-up excluded)."""
        now = time.monotonic()
        if self._rate_from is None or step < self._rate_from[1]:
            self._rate_from = (now, step)
            return None
        t0, s0 = self._rate_from
        if step <= s0:
            return None
        return (now - t0) / (step - s0) * (total - step)

    def step(self, step: int, total: int, **fields) -> None:
        eta = self.eta(step, total)
        if self.mode == "json":
            self._emit({"event": "step", "step": step, "total": total,
                        "eta_s": None if eta is None else round(eta, 1), **fields})
        elif self.mode == "bar" and not self.terminal:  # a log file: plain lines, no \r
            now = time.monotonic()
            first = self._last_plain is None
            if not (first or step >= total or now - self._last_plain >= PLAIN_STEP_EVERY_S):
                return
            self._last_plain = now
            extra = " ".join(f"{k} {_short(v)}" for k, v in fields.items())
            eta_text = "" if eta is None else f" eta {_clock(eta)}"
            self.stream.write(f"[step] {step}/{total}{eta_text} {extra}".rstrip() + "\n")
            self.stream.flush()
        elif self.mode == "bar":
            now = time.monotonic()
            if now - self._last_bar < 0.2 and step < total:
                return
            self._last_bar = now
            width = 30
            done = int(width * step / max(total, 1))
            extra = " ".join(f"{k} {_short(v)}" for k, v in fields.items())
            eta_text = "--:--" if eta is None else _clock(eta)
            self.stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} "
                              f"eta {eta_text} {extra}   ")
            self.stream.flush()
            self._bar_open = step < total
            if step >= total:
                self.stream.write("\n")


NO_PROGRESS = Progress("none")  # the default: reports nothing


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _clock(seconds: float) -> str:
    seconds = int(math.ceil(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "__fspath__"):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
