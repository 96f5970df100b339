"""Measuring processes from /proc (Linux) and reading Prometheus text: for the benchmarks.

Memory of a process tree is given both as RSS (what `ps` shows; shared pages counted once per
process, so a sum over Ray's processes overstates) and PSS (shared pages divided among their
sharers: a sum that adds up).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) "


def children_of(root: int) -> list[int]:
    """`root` and every descendant alive now."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(_stat_fields(int(entry))[1])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            parents.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def descendant_running(root: int, argument: str) -> int:
    """The descendant of `root` whose command line holds `argument` (e.g. its config file)."""
    for pid in children_of(root)[1:]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if argument.encode() in cmdline.read().split(b"\0"):
                    return pid
        except OSError:
            continue
    raise LookupError(f"no process under {root} runs with {argument!r}")


def _kib_field(path: str, key: str) -> int:
    try:
        with open(path) as source:
            for line in source:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class Memory:
    rss_bytes: int
    pss_bytes: int
    processes: int

    def __add__(self, other: Memory) -> Memory:
        return Memory(
            self.rss_bytes + other.rss_bytes,
            self.pss_bytes + other.pss_bytes,
            self.processes + other.processes,
        )


def memory_of(pids: Iterable[int]) -> Memory:
    total = Memory(0, 0, 0)
    for pid in pids:
        rss = _kib_field(f"/proc/{pid}/status", "VmRSS")
        if rss:
            total += Memory(rss, _kib_field(f"/proc/{pid}/smaps_rollup", "Pss"), 1)
    return total


def cpu_seconds(run: Callable[[], object]) -> float:
    """This process's CPU time (all its threads) while `run()` runs."""
    started = time.process_time()
    run()
    return time.process_time() - started


# The CPU window's group, and the results' key, for a coordinator's whole tree (driver + Ray)
COORDINATOR = "coordinator_and_ray"
# What each process of a coordinator's tree is, from its command line (Ray names its workers
# `ray::<actor or task>`, `ray::IDLE` between tasks); the first match wins.
_ROLES = (
    ("ray::FleetActor", "fleet actor"),
    ("ray::PartitionActor", "partition actor"),  # a partition's fleet state and MQTT ingest
    ("ray::DashboardAgent", "dashboard agent"),
    ("ray::RuntimeEnvAgent", "runtime-env agent"),
    ("ray::", "ray worker"),
    ("default_worker.py", "ray worker"),  # a worker starting, before it names itself
    ("log_monitor.py", "log monitor"),
    ("monitor.py", "autoscaler monitor"),
    ("dashboard.py", "dashboard (api server)"),
    ("coordinator.reaper", "reaper"),
)


_PROGRAMS = {"gcs_server": "gcs", "raylet": "raylet"}  # Ray's binaries, by their own name


def role_of(pid: int, root: int) -> str:
    if pid == root:
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as source:
            argv = source.read().decode(errors="replace").split("\0")
    except OSError:
        return "gone"
    program = os.path.basename(argv[0])  # the raylet's own arguments name every other program
    if program in _PROGRAMS:
        return _PROGRAMS[program]
    command = " ".join(argv)
    return next((role for mark, role in _ROLES if mark in command), "other")


def memory_by_role(root: int, pids: Iterable[int] | None = None) -> dict[str, Memory]:
    """The memory of `root`'s tree (or of `pids`, root the driver among them), summed per
    role (role_of): where a tree's PSS goes."""
    out: dict[str, Memory] = {}
    for pid in children_of(root) if pids is None else pids:
        role = role_of(pid, root)
        out[role] = out.get(role, Memory(0, 0, 0)) + memory_of([pid])
    return {role: memory for role, memory in out.items() if memory.processes}


def cpu_by_process(pids: Iterable[int]) -> dict[tuple[int, int], float]:
    """{(pid, start time): user + system CPU seconds so far}; the start time tells a reused pid
    apart. Children's times (cutime) are left out: a reaped child was counted on its own."""
    out = {}
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue  # ended meanwhile
        out[(pid, int(fields[19]))] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return out


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (every core; /proc/stat, idle and
    iowait left out): with the parties' own, it shows what else ran during a measurement."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


class CpuWindow:
    """CPU seconds groups of processes use in a `with` block (asked with `seconds()`).

    Sampled on a thread every `interval_s`, so a process that ends inside the window (Ray's
    workers come and go) still counts, up to its last sample. `labels` names each process of a
    group when first seen (e.g. role_of), for `seconds_by_label`: the group's CPU split by name,
    from the same samples. A process keeps its first name: named again later it could change
    (a worker turning into an actor, an exiting one whose command line reads empty).
    """

    def __init__(
        self,
        groups: dict[str, Callable[[], Iterable[int]]],
        interval_s: float = 0.5,
        labels: Mapping[str, Callable[[int], str]] | None = None,
    ) -> None:
        self._groups = groups
        self._interval = interval_s
        self._labels = dict(labels or {})
        self._named: dict[str, dict[tuple[int, int], str]] = {n: {} for n in self._labels}
        self._first: dict[str, dict] = {}
        self._last: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-window", daemon=True)

    def __enter__(self) -> CpuWindow:
        self._machine = machine_cpu_seconds()
        self._first = {name: self._read(name, pids) for name, pids in self._groups.items()}
        self._last = {name: dict(seen) for name, seen in self._first.items()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def seconds(self) -> dict[str, float]:
        """CPU seconds per group from the start of the window until now, and `other`: what
        every other process of the machine used meanwhile."""
        self._sample()
        used = {
            name: sum(cpu - self._first[name].get(key, 0.0) for key, cpu in last.items())
            for name, last in self._last.items()
        }
        used["other"] = max(0.0, machine_cpu_seconds() - self._machine - sum(used.values()))
        return used

    def seconds_by_label(self, name: str) -> dict[str, float]:
        """Group `name`'s CPU seconds so far, per label of its processes (as of the last
        sample: call seconds() first)."""
        with self._lock:
            first, named, out = self._first[name], self._named[name], {}
            for key, cpu in self._last[name].items():
                label = named[key]
                out[label] = out.get(label, 0.0) + cpu - first.get(key, 0.0)
        return out

    def _read(self, name: str, pids: Callable[[], Iterable[int]]) -> dict:
        now = cpu_by_process(pids())
        label = self._labels.get(name)
        if label is not None:
            with self._lock:  # the sampling thread and seconds() both read: one name a process
                named = self._named[name]
                for key in now.keys() - named.keys():
                    named[key] = label(key[0])
        return now

    def _sample(self) -> None:
        for name, pids in self._groups.items():
            now = self._read(name, pids)
            with self._lock:
                self._last[name].update(now)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()


class PeakMemory:
    """Samples the memory of a process tree on a thread; keeps the highest total seen, and
    what each role (role_of) held at that moment and at its own highest."""

    def __init__(
        self,
        root: int | Callable[[], list[int]],
        interval_s: float = 0.5,
        driver: int | None = None,
    ) -> None:
        """root: a process (its tree is sampled), or what lists the processes to sample;
        driver: the process whose role is `driver` (default: root, if a process)."""
        self._tree = (lambda: children_of(root)) if isinstance(root, int) else root
        self._driver = root if isinstance(root, int) else (driver if driver is not None else -1)
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak = Memory(0, 0, 0)
        self.at_peak: dict[str, Memory] = {}  # role -> its memory in the sample of the peak
        self.role_peaks: dict[str, Memory] = {}  # role -> its own highest PSS
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            roles = memory_by_role(self._driver, self._tree())
            now = sum(roles.values(), Memory(0, 0, 0))
            if now.pss_bytes > self.peak.pss_bytes:
                self.peak, self.at_peak = now, roles
            for role, memory in roles.items():
                if memory.pss_bytes > self.role_peaks.get(role, Memory(0, 0, 0)).pss_bytes:
                    self.role_peaks[role] = memory
            self._stop.wait(self._interval)


Samples = dict[tuple[str, frozenset], float]


def parse_prometheus(text: str) -> Samples:
    """{(name, frozenset of (label, value)): value} for every sample line."""
    out: Samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        out[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), value in samples.items():
        if n == name:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + value
    return out
