"""One child process, run the way every dev tool, benchmark and end-to-end test runs them.

A :class:`Process` starts its command as the leader of a new process group
(so a stop reaches whatever it starts in turn), sends its output to a log
file, waits until a probe says it is ready (failing at once, with the log's
tail, if it exits first) and stops it within a grace period: SIGTERM to the
group, SIGKILL to the group once the grace is over, and SIGKILL to the
stragglers the leader left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal the kernel sends a process when its parent dies."""


class ProcessFailed(RuntimeError):
    """A child process did not start or stay up as asked; the message ends with its log's tail."""


class ProcessExited(ProcessFailed):
    """The process exited while it was expected to be running (during start-up or since)."""


class NotReady(ProcessFailed):
    """The process was still running, but its probe never said it was ready in time."""


@dataclass
class Process:
    """A command run as the leader of its own process group, its output appended to a log file."""

    name: str
    """What messages call it (``engine-0``, ``SeaweedFS``)."""
    command: Sequence[str]
    log_path: Path
    """Where stdout and stderr go; its tail is in every error about the process."""
    env: Mapping[str, str] | None = None
    """The child's whole environment; None inherits this process's."""
    cwd: Path | None = None
    dies_with_parent: bool = False
    """Linux: the kernel SIGTERMs the child when the thread that started it exits, even by
    SIGKILL, so a crashed tool leaves no servers behind. Start it from a thread that lives
    as long as the child should."""
    truncate_log: bool = False
    """Empty the log at each start instead of appending (a benchmark's log is of one run)."""
    grace: float = 30.0
    """Seconds :meth:`stop` waits after SIGTERM before it SIGKILLs the group."""
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    """The running (or last) child; None until :meth:`start`."""

    def start(self) -> Self:
        """Start the command; again after an exit, too (one log for all runs unless truncated)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb" if self.truncate_log else "ab") as log:
            self.popen = subprocess.Popen(
                list(self.command),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_death_signal_hook() if self.dies_with_parent else None,
            )
        return self

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_running(self) -> None:
        """Raise :class:`ProcessExited`, with the log's tail, if the process has exited."""
        code = self._started().poll()
        if code is not None:
            raise ProcessExited(self._report(_describe_exit(code)))

    def wait_ready(
        self,
        probe: Callable[[], bool] | None = None,
        *,
        url: str | None = None,
        timeout: float,
        interval: float = 0.5,
    ) -> float:
        """Poll until ``probe`` returns True and ``url`` answers 2xx; the seconds it took.

        A probe that raises has simply not succeeded yet (a server that is not
        listening refuses connections); the last such error is named if time
        runs out. Raises :class:`ProcessExited` as soon as the process exits,
        :class:`NotReady` after ``timeout`` seconds.
        """
        checks = [c for c in (probe, _answers_2xx(url) if url else None) if c is not None]
        if not checks:
            raise ValueError("wait_ready needs a probe, a url or both")
        started = time.monotonic()
        deadline = started + timeout
        last: Exception | None = None
        while True:
            self.check_running()
            try:
                if all(check() for check in checks):
                    return time.monotonic() - started
            except Exception as exc:  # not up yet, as far as anyone can tell from outside
                last = exc
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(interval, left))
        self.check_running()  # an exit during the last probe is the better explanation
        where = f" at {url}" if url else ""
        because = f" (last probe error: {last!r})" if last else ""
        raise NotReady(self._report(f"not ready{where} after {timeout:g} s{because}")) from last

    def terminate(self) -> None:
        """SIGTERM the group without waiting: to stop several processes at once, then each."""
        if self.alive:
            self._signal_group(signal.SIGTERM)

    def stop(self, grace: float | None = None, *, leader_only: bool = False) -> int | None:
        """SIGTERM, as an orchestrator stops a pod; SIGKILL after the grace; the exit status.

        ``leader_only`` sends SIGTERM to the leader alone and leaves its children
        to it, for a process whose job is to stop them (``loraplex serve`` and its
        engines): whatever it leaves behind stays visible to the caller. A leader
        that outstays the grace is SIGKILLed with its whole group either way.
        """
        popen = self.popen
        if popen is None:
            return None
        if popen.poll() is None:
            if leader_only:
                popen.send_signal(signal.SIGTERM)
            else:
                self._signal_group(signal.SIGTERM)
            try:
                popen.wait(self.grace if grace is None else grace)
            except subprocess.TimeoutExpired:
                return self.kill()
        if not leader_only:
            self._signal_group(signal.SIGKILL)  # what the leader started and left behind
        return popen.returncode

    def kill(self) -> int | None:
        """SIGKILL the whole group, as a crashed node or the OOM killer would; the exit status."""
        if self.popen is None:
            return None
        self._signal_group(signal.SIGKILL)
        return self.popen.wait()

    def tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _signal_group(self, sig: signal.Signals) -> None:
        # The group outlives its leader while any member does; once it is empty there is
        # nothing left to signal.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._started().pid, sig)

    def _started(self) -> subprocess.Popen[bytes]:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.popen

    def _report(self, problem: str) -> str:
        return f"{self.name} {problem}; see {self.log_path}:\n{self.tail()}"


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _answers_2xx(url: str) -> Callable[[], bool]:
    def answers() -> bool:
        # urlopen raises for an error status, which wait_ready counts as not ready yet.
        with urllib.request.urlopen(url, timeout=2) as answer:
            return 200 <= answer.status < 300

    return answers


def _death_signal_hook() -> Callable[[], None]:
    """A ``preexec_fn`` that asks the kernel to SIGTERM the child when its parent dies."""
    # libc is loaded before the fork: loading a library in the forked child of a
    # threaded program can deadlock on a lock another thread held.
    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    parent = os.getpid()

    def arrange() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)

    return arrange
