"""Resumable training loops for the bundled models' scripts (``python/train_toy.py``,
``python/finetune_sjd2.py``).

A loop saves its whole state (weights, optimiser, data order, random generators, step, losses,
training time) at step boundaries: every ``every_s`` seconds of training and when the process gets
SIGINT (Ctrl-C) or SIGTERM, which then ends the run (exit status 130) instead of losing it. The same
command with ``--resume`` continues from the file; with the step-based schedules the resumed run's
weights equal an uninterrupted run's bit for bit (same threads, same machine). The file records a
fingerprint of what the run depends on (its settings, seed and a digest of the training tokens): a
resume whose fingerprint differs is refused, naming what changed. The file is removed once the
weights are saved.

Files go to ``$SJD_TRAIN_CACHE`` (default ``~/.cache/sjd_kernels/train``), outside the repository
and the package's weights folder, unless the script's ``--checkpoint`` names one.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch

from .._cache import cache_dir

FORMAT = 1
_CLAIMS: dict = {}                                          # state path -> this process's Claim


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed: missing, unreadable, or from a run with other settings."""


class Interrupted(Exception):
    """The loop stopped at a step boundary on a signal; its state is in ``path``."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"interrupted before step {step}; state saved to {path}")
        self.step, self.path = step, path


def default_path(script: str, model: str) -> Path:
    return cache_dir("SJD_TRAIN_CACHE", "train") / f"{script}_{model}.pt"


def digest(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' shapes, dtypes and bytes (the training data a run saw)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def add_flags(ap, script: str, what: str = "the training") -> None:
    """``--resume``, ``--checkpoint`` and ``--checkpoint-minutes`` of a training script named ``script``
    (``what``: the part of the run they concern, for the help texts)."""
    ap.add_argument("--resume", action="store_true",
                    help=f"continue {what} from its saved state (--checkpoint), after an interrupted run of the same "
                         f"command")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help=f"{what}'s state, saved every --checkpoint-minutes and on Ctrl-C / SIGTERM, removed once the "
                         f"weights are written (default: $SJD_TRAIN_CACHE or ~/.cache/sjd_kernels/train, file "
                         f"{script}_<model>.pt)")
    ap.add_argument("--checkpoint-minutes", type=float, default=2.0,
                    help="minutes of training between saves of the state (default 2; 0 = only on a signal)")


def check_flags(error, args, script: str, trains: bool = True) -> Path:
    """Check the flags of ``add_flags`` before any work (``error``: the parser's, exit 2) and return the
    state's path, claimed for this process (``Claim``; ``release(path)`` when the run is done).
    ``trains``: this run trains the part the state belongs to (else ``--resume`` and ``--checkpoint``
    are refused, and a saved state is left alone)."""
    from ..demo import check_flags as check_rows, check_output_file
    cm = args.checkpoint_minutes
    check_rows(error, [("--checkpoint-minutes", cm, math.isfinite(cm) and cm >= 0,
                        "a finite number >= 0 (0 = save only on a signal)")])
    path = args.checkpoint or default_path(script, args.model)
    if not trains:
        if args.resume or args.checkpoint is not None:
            error("argument --resume/--checkpoint: they belong to a stage this run leaves out")
        return path
    check_output_file(error, "--checkpoint", path)          # first: a folder is not a missing or a held state
    claim = _CLAIMS.get(path) or Claim(path)
    try:
        claim.acquire()
    except (ResumeError, OSError) as e:
        error(f"argument --checkpoint: {e}")
    _CLAIMS[path] = claim
    atexit.register(claim.release)                          # also when a later check or the run fails
    if args.resume and not path.is_file():
        error(f"argument --resume: no saved training state at {path} (it is written while the training runs and "
              f"removed when the run ends)")
    if not args.resume and path.exists():
        error(f"argument --resume: {path} holds the state of an interrupted run: continue it with --resume, or "
              f"remove the file to start afresh")
    return path


def release(path) -> None:
    """Give up this process's claim on the state path (``check_flags``)."""
    claim = _CLAIMS.pop(Path(path), None)
    if claim is not None:
        claim.release()


@contextlib.contextmanager
def exits(log):
    """Around a resumable stage: a state that cannot be resumed ends the run with status 2, a stop on
    a signal (its state saved) with status 130, each with a line in ``log``."""
    try:
        yield
    except ResumeError as e:
        log(f"cannot resume: {e}")
        raise SystemExit(2)
    except Interrupted as e:
        log(f"{e}: nothing else was saved; continue with the same command and --resume")
        raise SystemExit(130)


def finish(path, log) -> None:
    """After the weights are written: remove the state at ``path`` (saying so in ``log``) and release
    this process's claim on it."""
    path = Path(path)
    if path.exists():
        path.unlink()
        log(f"removed the training state {path}")
    release(path)


class StopOnSignal:
    """While active, SIGINT and SIGTERM set ``requested`` instead of ending the process, so the loop
    can save its state at the next step boundary. A second SIGINT raises KeyboardInterrupt at once; a
    second SIGTERM ends the process as SIGTERM does. A signal the process ignores (``SIG_IGN``, as in
    background jobs of some shells) stays ignored. Outside the main thread (where Python cannot
    install handlers) it does nothing. The handler writes its note with ``os.write`` to stderr: a
    buffered ``print`` can fail when the signal lands while the loop is writing to the same stream."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)          # a second SIGTERM: end as SIGTERM would
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        name = signal.Signals(signum).name
        os.write(2, f"\n{name}: stopping at the next step boundary and saving the training state "
                    f"(Ctrl-C again to stop at once, unsaved)\n".encode())

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
        return False


class Claim:
    """Exclusive use of a state path by one process: ``<path>.lock`` made with ``O_EXCL`` and holding
    the owner's pid (and, on Linux, the process's start time), so two runs of one script and model cannot
    overwrite (or, when one ends, remove) each other's state. A lock whose process no longer runs (killed)
    is taken over, also when its pid has since been given to another process (the start times differ);
    one of this very process is too (a script's ``main`` called again in one process). ``release()``
    removes it."""

    def __init__(self, path):
        self.lock = Path(str(path) + ".lock")
        self.held = False

    def acquire(self) -> None:
        """Take the lock; ResumeError naming the process that holds it."""
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, started = _read_lock(self.lock)
                if pid > 0 and pid != os.getpid() and _alive(pid, started):
                    raise ResumeError(f"another run (process {pid}) is using {self.lock.with_suffix('')}; wait for "
                                      f"it to end, or give this run its own --checkpoint") from None
                self.lock.unlink(missing_ok=True)          # stale (its process ended) or ours: take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(_lock_text(os.getpid()))
            self.held = True
            return
        raise ResumeError(f"could not take the lock {self.lock}")

    def release(self) -> None:
        if self.held:
            self.lock.unlink(missing_ok=True)
            self.held = False


def _start_time(pid: int):
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None where
    there is no such file (not Linux, or no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return int(stat[stat.rindex(")") + 2:].split()[19])   # fields 3.. follow the name's ")"
    except (OSError, ValueError, IndexError):
        return None


def _lock_text(pid: int) -> str:
    started = _start_time(pid)
    return str(pid) if started is None else f"{pid} {started}"


def _read_lock(lock: Path):
    """(pid, start time or None) from a lock file; (0, None) when it cannot be read."""
    try:
        words = lock.read_text().split()
        return int(words[0]), (int(words[1]) if len(words) > 1 else None)
    except (OSError, ValueError, IndexError):
        return 0, None


def _alive(pid: int, started=None) -> bool:
    """Whether the process that wrote a lock still runs: ``pid`` exists and, when both start times are
    known, it is the same process (not a later one given the same pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                 # another user's process
        pass
    now = _start_time(pid) if started is not None else None
    return now is None or now == started


class Checkpointer:
    """Saves and restores one loop's state at ``path``.

    ``fingerprint``: a JSON-like dict of everything the run's outcome depends on; ``every_s``: seconds
    of training between saves (0: only on a signal); ``stop``: an object whose ``requested`` ends the
    loop (a ``StopOnSignal``)."""

    def __init__(self, path, fingerprint: dict, every_s: float = 120.0, stop=None):
        self.path = Path(path)
        self.fingerprint = dict(fingerprint)
        self.every_s = float(every_s)
        self.stop = stop
        self._last = time.time()

    def load(self, only=None) -> dict:
        """The saved state; ResumeError when there is none or it belongs to another run (``only``: compare
        just these keys of the fingerprint, for a check before the data that the rest needs exist)."""
        if not self.path.is_file():
            raise ResumeError(f"no training state at {self.path} to resume from")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:                              # noqa: BLE001 (a truncated or foreign file)
            raise ResumeError(f"{self.path} is not a readable training state ({type(e).__name__}: {e})") from e
        if not isinstance(state, dict) or state.get("format") != FORMAT or "fingerprint" not in state:
            raise ResumeError(f"{self.path} is not a training state of this version (format {FORMAT})")
        old = state["fingerprint"]
        keys = set(old) | set(self.fingerprint) if only is None else set(only)
        changed = sorted(k for k in keys if old.get(k) != self.fingerprint.get(k))
        if changed:
            what = "; ".join(f"{k}: saved {old.get(k)!r}, now {self.fingerprint.get(k)!r}" for k in changed)
            raise ResumeError(f"{self.path} was saved by a run with other settings or data, so it cannot be "
                              f"continued: {what}")
        self._last = time.time()
        return state

    def save(self, state: dict) -> None:
        """Write ``state`` (with the fingerprint) atomically: a crash mid-write leaves the old file, and a
        failed write (full disk, a second Ctrl-C) leaves no temporary file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        try:
            torch.save({"format": FORMAT, "fingerprint": self.fingerprint, **state}, tmp)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._last = time.time()

    @contextlib.contextmanager
    def signals(self):
        """Around a training loop (only the loop: a signal after it ends the process as usual): SIGINT and
        SIGTERM become stop requests its step boundaries honour, unless ``stop`` was given."""
        if self.stop is not None:
            yield self
            return
        with StopOnSignal() as s:
            self.stop = s
            try:
                yield self
            finally:
                self.stop = None

    def boundary(self, step: int, state) -> None:
        """At the start of ``step``: save when due or asked to stop (``state()`` builds the dict), and
        raise ``Interrupted`` when asked to stop."""
        stopping = self.stop is not None and self.stop.requested
        if stopping or (self.every_s > 0 and time.time() - self._last >= self.every_s):
            self.save(state())
        if stopping:
            raise Interrupted(step, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
