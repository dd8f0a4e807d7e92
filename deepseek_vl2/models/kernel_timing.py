"""Timing kernel candidates on first use: the fastest is kept for the process and, by default, on disk.

Which kernel runs a decode step's products fastest (PyTorch's GEMV or oneDNN) depends on the CPU and on
everything else the step reads: timed apart, in a loop over hot operands, a product misjudges how it runs
between the step's other reads. So a decode step's choices are settled inside real decode steps
(:class:`StepTuning`, one question at a time, the two answers on interleaved steps), timing only the
blocks that run the question's op: a whole step's time drifts by more than a small product's share of
it on a shared host. A prefill's product with quantized weights, compute-bound and able to run twice
on its own operands, is timed on the call itself (:meth:`KernelTimer.choose`).
The disk file keeps choices per machine (CPU model, vector extensions, torch version), so that later
processes skip the timing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from ..utils.heap import trim_heap

CACHE_ENV = "DEEPSEEK_VL2_KERNEL_CACHE"  # the JSON file of kept choices; empty: keep them for the process only
DEFAULT_CACHE = Path("~/.cache/deepseek_vl2/kernel-choices.json")
# Another candidate must beat the first (the rule's answer) by this share to be chosen: within noise,
# the rule stands.
MARGIN = 0.10
REPEATS = 3
STEP_ORDER = (0, 1, 1, 0, 0, 1)  # first, other, ...: ABBAAB cancels a steady drift of the step time
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
# Kept choices carry the way they were timed: those settled another way (on whole steps' times; before the
# experts' in-place path ran lone pairs on GEMV) are timed again.
TIMING_METHOD = "blocks in steps, lone pairs on GEMV"


@dataclass(frozen=True)
class Measurement:
    """One timing: what was timed, each candidate's best time (seconds), and the kernel chosen."""

    key: str
    seconds: dict[str, float]
    chosen: str


@cache
def machine_key() -> str:
    """What the speed order of kernels depends on, besides shapes and threads: the CPU, its vector units, torch.

    A VM's model name can hide the generation ("AMD EPYC" for both Zen 4 and Zen 5, which differ), so the
    CPU's family and model numbers are part of the key.
    """
    fields, flags = {}, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "flags":
                flags = set(value.split())
                break
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name", "unknown CPU")
    if "cpu family" in fields:
        cpu += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    features = "+".join(f for f in CPU_FEATURES if f in flags) or torch.backends.cpu.get_cpu_capability()
    return f"{cpu} | {features} | torch {torch.__version__} | {TIMING_METHOD}"


def time_candidates(candidates: Sequence, trial: Callable[[object], object], repeats: int = REPEATS) -> dict:
    """Best wall time of ``trial(candidate)`` per candidate, after one warm-up each, interleaved.

    The trials' freed temporaries are handed back afterwards: a prefill's first calls are timed between
    its long-lived tensors, and the heap would otherwise keep them resident (gigabytes over a model).
    """
    best = dict.fromkeys(candidates, float("inf"))
    for candidate in candidates:
        trial(candidate)
    for _ in range(repeats):
        for candidate in candidates:
            start = time.perf_counter()
            trial(candidate)
            best[candidate] = min(best[candidate], time.perf_counter() - start)
    trim_heap()
    return best


def fastest(seconds: dict):
    """The first candidate unless another is faster by more than :data:`MARGIN`."""
    first = next(iter(seconds))
    winner = min(seconds, key=seconds.get)
    return winner if seconds[winner] < (1 - MARGIN) * seconds[first] else first


class KernelTimer:
    """Times candidates once per key and remembers the winner (by value), in memory and in ``path``."""

    def __init__(self, path: Path | None):
        self.path = path
        self.measurements: list[Measurement] = []
        self._chosen: dict[str, str] | None = None
        self._lock = threading.RLock()  # a measurement may ask for another choice

    def choose(self, key: str, candidates: Sequence, measure: Callable[[], dict]):
        """The remembered winner for ``key``, or ``measure()`` the candidates' seconds now and keep the winner."""
        by_value = {candidate.value: candidate for candidate in candidates}
        with self._lock:
            chosen = self._kept().get(key)
            if chosen not in by_value:
                seconds = measure()
                chosen = fastest(seconds).value
                self.measurements.append(Measurement(key, {c.value: s for c, s in seconds.items()}, chosen))
                self._kept()[key] = chosen
                self._save()
            return by_value[chosen]

    def keep(self, key: str, value: str) -> None:
        """Keep a choice settled elsewhere (inside decode steps)."""
        with self._lock:
            self._kept()[key] = value
            self._save()

    def choices(self) -> dict[str, str]:
        """What is kept for this machine: kernel by key, timed in this process or read from the file."""
        with self._lock:
            return dict(self._kept())

    def _kept(self) -> dict[str, str]:
        if self._chosen is None:
            self._chosen = self._read().get(machine_key(), {})
        return self._chosen

    def _read(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            stored = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # unreadable: timed again, and rewritten
        return stored if isinstance(stored, dict) else {}

    def _save(self) -> None:
        if self.path is None:
            return
        stored = self._read()
        stored[machine_key()] = self._chosen
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps(stored, indent=1, sort_keys=True))
            partial.replace(self.path)
        except OSError:
            self.path = None  # a read-only home: keep choices for this process only


class StepTuning:
    """Settles questions ("which kernel for this product?") inside steps of one kind, one at a time.

    A step's blocks that run a question's op ask :meth:`answering` for the kernel: the settled answer, or
    for the question under test the answer this step tries (the first or the other, in
    :data:`STEP_ORDER`), or the first. The tested question's blocks are timed and their time summed over
    the step; :meth:`step_done` records it. After the order, the other answer is kept if its median is
    :data:`MARGIN` faster. A question that a step did not ask yields its turn to one that it did.
    Settled answers go to ``timer`` under ``prefix + question``.
    """

    def __init__(self, timer: KernelTimer, prefix: str, clock: Callable[[], float] = time.perf_counter):
        self.timer, self.prefix, self.clock = timer, prefix, clock
        self.settled = {
            key.removeprefix(prefix): value for key, value in timer.choices().items() if key.startswith(prefix)
        }
        self.seen: dict[str, tuple[str, str]] = {}  # question -> (first, other), in the order first asked
        self.testing: str | None = None
        self.seconds: tuple[list[float], list[float]] = ([], [])
        self.measurements: list[Measurement] = []
        self._spent: float | None = None  # this step's time in the tested question's blocks; None: not asked
        self._asked: list[str] = []  # the unsettled questions this (or the last) step asked

    def step_started(self) -> None:
        self._spent, self._asked = None, []

    @contextmanager
    def answering(self, question: str, first: str, other: str) -> Iterator[str]:
        """The answer for a block that runs ``question``'s op; while the question is under test, timed."""
        if question in self.settled:
            yield self.settled[question]
            return
        self.seen.setdefault(question, (first, other))
        self._asked.append(question)
        if question != self.testing:
            yield first
            return
        start = self.clock()
        yield self.seen[question][STEP_ORDER[sum(map(len, self.seconds))]]
        self._spent = (self._spent or 0.0) + self.clock() - start  # not after an error: its time says nothing

    def step_done(self) -> None:
        if self.testing is not None and self._spent is None:
            self._test_next()  # no longer asked (a short prompt's cache class, say): another takes the turn
        elif self.testing is not None:
            self.seconds[STEP_ORDER[sum(map(len, self.seconds))]].append(self._spent)
            if sum(map(len, self.seconds)) == len(STEP_ORDER):
                self._settle()
        if self.testing is None:
            self._test_next()

    def _test_next(self) -> None:
        """Test an unsettled question, one this step asked first (the one under test keeps its times)."""
        waiting = [q for q in self._asked + list(self.seen) if q not in self.settled]
        testing = waiting[0] if waiting else None
        if testing != self.testing:
            self.testing, self.seconds = testing, ([], [])

    def _settle(self) -> None:
        question, (first, other) = self.testing, self.seen[self.testing]
        medians = [sorted(times)[len(times) // 2] for times in self.seconds]
        chosen = other if medians[1] < (1 - MARGIN) * medians[0] else first
        self.settled[question] = chosen
        self.measurements.append(Measurement(self.prefix + question, {first: medians[0], other: medians[1]}, chosen))
        self.timer.keep(self.prefix + question, chosen)
        self.testing = None

    @property
    def done(self) -> bool:
        """Whether the last step asked only settled questions (one seen once may never be asked again)."""
        return not self._asked


def default_timer() -> KernelTimer:
    """The process's timer, keeping choices where :data:`CACHE_ENV` says (by default :data:`DEFAULT_CACHE`)."""
    setting = os.environ.get(CACHE_ENV)
    if setting is None:
        return KernelTimer(DEFAULT_CACHE.expanduser())
    return KernelTimer(Path(setting).expanduser() if setting else None)
