#!/usr/bin/env python3
"""Benchmarks ``LayerUnpacker.unpack_layers`` against GNU tar and umoci.

Usage::

    python3 bench/unpack.py [--rounds 5] [--small | --pull-image] [--level 6] [--python PATH]
                            [--profile] [--json FILE] [--keep]

It writes an OCI image layout of four layers, each one file of 32 MiB incompressible
bytes, and a fifth of 10,000 small text files (64 B to 4 KiB) in 100 directories, gzip
level 6 by default (``--small``: 4 x 4 MiB and 1,000 files in 10 directories), and times,
in every round, the same layer files turned into a root filesystem three ways:

    ours    ``PYTHON -c "zr.LayerUnpacker(DEST).unpack_layers([layer, ...])"``, a fresh
            process; the layer files straight from the layout, no registry, no cache
    tar     ``tar -xzf LAYER -C DEST`` once per layer, in order, each after the last, as
            an unpacker applies layers (GNU tar runs ``gzip -d`` in a second process)
    umoci   ``umoci unpack --rootless --image LAYOUT:TAG BUNDLE`` (it also verifies every
            blob's digest and writes an mtree manifest of the whole rootfs)

Wall time is of the whole step, process start included; CPU is user + system of the step's
processes and whatever they waited for. Ratios are taken within a round, then the median
of them is shown beside the ratio of the medians. An untimed warm-up round first puts the
layer files in the page cache; before every timed step the previous output is removed and
``sync`` writes dirty pages back, so one tool's writeback is not billed to the next. The
first round checks that the three trees are the same (paths, types, modes, contents).
``--profile`` adds one run of ours under cProfile and prints its top entries.

The zlayer_registry.py under test is copied at start, so edits made while the benchmark
runs do not reach it. Everything is written under one temporary directory, removed on
every exit, Ctrl-C and SIGTERM included; a running child is killed with its process group.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # for _oci_testkit, the repository's test helper

import _oci_testkit as kit  # noqa: E402

TAG = "v1"
TARGET_TAR_RATIO = 1.0  # ours / tar, wall time
PROFILE_TOP = 25

_UNPACK_SCRIPT = """\
import sys, time
import zlayer_registry as zr
start = time.perf_counter()
zr.LayerUnpacker(sys.argv[1]).unpack_layers(sys.argv[2:])
print("%.6f" % (time.perf_counter() - start))
"""

_PROFILE_SCRIPT = """\
import cProfile, pstats, sys
import zlayer_registry as zr
profile = cProfile.Profile()
profile.enable()
zr.LayerUnpacker(sys.argv[1]).unpack_layers(sys.argv[3:])
profile.disable()
stats = pstats.Stats(profile, stream=sys.stdout).strip_dirs()
for key in ("tottime", "cumulative"):
    print("== top %s by %s" % (sys.argv[2], key))
    stats.sort_stats(key).print_stats(int(sys.argv[2]))
"""


class BenchError(Exception):
    """Says that a step of the benchmark failed (a tool exited non-zero, a check failed)."""


# =============================================================================
# 1. THE IMAGE
# =============================================================================


@dataclasses.dataclass(frozen=True)
class Shape:
    """Is the size of the generated image."""

    big_files: int
    big_file_bytes: int
    small_files: int
    small_dirs: int

    def describe(self) -> str:
        return "%d x %d MiB incompressible + %d small files in %d directories" % (
            self.big_files, self.big_file_bytes // kit.MIB, self.small_files, self.small_dirs)


FULL = Shape(big_files=4, big_file_bytes=32 * kit.MIB, small_files=10_000, small_dirs=100)
SMALL = Shape(big_files=4, big_file_bytes=4 * kit.MIB, small_files=1_000, small_dirs=10)
# The pull benchmark's image (bench/pull.py): six 48 MiB layers and 10,000 small files.
PULL = Shape(big_files=6, big_file_bytes=48 * kit.MIB, small_files=10_000, small_dirs=100)


def _small_file_entries(shape: Shape) -> List[kit.TarEntry]:
    entries = [kit.dir_entry("usr"), kit.dir_entry("usr/share")]
    per_dir = -(-shape.small_files // shape.small_dirs)
    for d in range(shape.small_dirs):
        directory = "usr/share/d%03d" % d
        entries.append(kit.dir_entry(directory))
        for i in range(d * per_dir, min((d + 1) * per_dir, shape.small_files)):
            line = ("file %d of directory %d\n" % (i, d)).encode()
            size = 64 << (i % 7)  # 64 B .. 4 KiB
            entries.append(kit.file_entry("%s/f%05d.txt" % (directory, i),
                                          (line * (size // len(line) + 1))[:size],
                                          mode=0o755 if i % 10 == 0 else 0o644))
    return entries


def build_layout(layout: Path, shape: Shape, level: int) -> kit.ImageInfo:
    """Writes the benchmark image into ``layout`` under TAG."""
    layers = []
    for n in range(shape.big_files):
        entries = [kit.dir_entry("opt"), kit.dir_entry("opt/big%d" % n),
                   kit.random_file_entry("opt/big%d/blob.bin" % n, shape.big_file_bytes, seed=n)]
        layers.append(kit.write_entries_layer(layout, entries, "gzip", compresslevel=level))
    layers.append(kit.write_entries_layer(layout, _small_file_entries(shape), "gzip",
                                          compresslevel=level))
    return kit.build_image_from_layers(layout, TAG, layers)


# =============================================================================
# 2. TIMED STEPS
# =============================================================================


@dataclasses.dataclass
class Step:
    """Is one timed step: wall and CPU seconds, and what its last process printed."""

    wall_s: float
    cpu_s: float  # user + system
    sys_s: float  # system alone: file creation, page cache, writeback
    stdout: str = ""


class Runner:
    """Runs child processes one at a time in their own process group, killable on exit."""

    def __init__(self, env: Dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self._live: Optional[subprocess.Popen] = None

    def run(self, name: str, cmd: Sequence[str]) -> Step:
        """Runs ``cmd``; returns its wall and CPU time; raises BenchError when it fails."""
        out_path, err_path = self.log_dir / (name + ".out"), self.log_dir / (name + ".err")
        with open(str(out_path), "wb") as out, open(str(err_path), "wb") as err:
            start_s = time.perf_counter()
            proc = subprocess.Popen(list(cmd), env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True)
            self._live = proc
            # wait4: the CPU of this child and of what it waited for (tar's gzip -d).
            _pid, status, usage = os.wait4(proc.pid, 0)
            wall_s = time.perf_counter() - start_s
            proc.returncode = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
            self._live = None
        if proc.returncode != 0:
            raise BenchError("%s failed (%d): %s\n%s" % (
                name, proc.returncode, " ".join(cmd),
                err_path.read_text(errors="replace")[-1500:].strip()))
        return Step(wall_s, usage.ru_utime + usage.ru_stime, usage.ru_stime,
                    out_path.read_text(errors="replace"))

    def output(self, cmd: Sequence[str]) -> str:
        """Runs a short untimed command; returns its stdout and stderr."""
        proc = subprocess.run(list(cmd), env=self.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
        if proc.returncode != 0:
            raise BenchError("%s failed: %s" % (" ".join(cmd), proc.stdout.decode()[-1500:]))
        return proc.stdout.decode(errors="replace")

    def kill_live(self) -> None:
        """Kills the running child and its process group, if any."""
        proc, self._live = self._live, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


@dataclasses.dataclass
class Bench:
    """Holds what every round needs."""

    runner: Runner
    work: Path
    layout: Path
    info: kit.ImageInfo
    layers: List[Path]
    python: str
    tar: str
    umoci: str

    def out(self, name: str) -> Path:
        return self.work / "out" / name


def _fresh(bench: Bench, name: str) -> Path:
    """Removes the previous output of ``name`` and flushes dirty pages; returns the path."""
    path = bench.out(name)
    kit.rmtree(path)
    os.sync()
    return path


def unpack_ours(bench: Bench) -> Step:
    dest = _fresh(bench, "ours")
    step = bench.runner.run("ours", [bench.python, "-c", _UNPACK_SCRIPT, str(dest)]
                            + [str(p) for p in bench.layers])
    step.stdout = step.stdout.strip()  # seconds inside unpack_layers
    return step


def unpack_tar(bench: Bench) -> Step:
    dest = _fresh(bench, "tar")
    dest.mkdir()
    total = Step(0.0, 0.0, 0.0)
    for n, layer in enumerate(bench.layers):
        step = bench.runner.run("tar-%d" % n, [bench.tar, "-xzf", str(layer), "-C", str(dest)])
        total.wall_s += step.wall_s
        total.cpu_s += step.cpu_s
        total.sys_s += step.sys_s
    return total


def unpack_umoci(bench: Bench) -> Step:
    bundle = _fresh(bench, "umoci")
    return bench.runner.run("umoci", [bench.umoci, "unpack", "--rootless", "--image",
                                      "%s:%s" % (bench.layout, TAG), str(bundle)])


TOOLS = (("ours", unpack_ours), ("tar", unpack_tar), ("umoci", unpack_umoci))


def check_trees(bench: Bench) -> str:
    """Raises BenchError unless ours, tar and umoci produced the same tree; returns a summary."""
    trees = {
        "ours": kit.snapshot_tree(bench.out("ours")),
        "tar": kit.snapshot_tree(bench.out("tar")),
        "umoci": kit.snapshot_tree(bench.out("umoci") / "rootfs"),
    }
    reference = kit.comparable({p: i for p, i in trees["ours"].items() if p != "."})
    for name in ("tar", "umoci"):
        other = kit.comparable({p: i for p, i in trees[name].items() if p != "."})
        differences = kit.tree_differences(reference, other)
        if differences:
            raise BenchError("ours and %s differ:\n  %s" % (name, "\n  ".join(differences[:20])))
    files = sum(1 for i in trees["ours"].values() if i["type"] == "file")
    size = sum(i.get("size", 0) for i in trees["ours"].values())
    return "%d entries, %d files, %.1f MiB, identical in ours, tar and umoci" % (
        len(reference), files, size / kit.MIB)


def run_rounds(bench: Bench, rounds: int) -> List[Dict[str, Step]]:
    """Runs a warm-up round, checks the trees, then ``rounds`` timed rounds."""
    for _name, fn in TOOLS:
        fn(bench)
    print("bench: warm-up done; %s" % check_trees(bench), file=sys.stderr)
    samples = []
    for number in range(1, rounds + 1):
        sample = {name: fn(bench) for name, fn in TOOLS}
        samples.append(sample)
        print("bench: round %d/%d: %s" % (number, rounds, ", ".join(
            "%s %.2fs" % (name, step.wall_s) for name, step in sample.items())), file=sys.stderr)
    return samples


def profile_ours(bench: Bench) -> str:
    """Runs ours once under cProfile; returns pstats' top entries."""
    dest = _fresh(bench, "ours")
    return bench.runner.output([bench.python, "-c", _PROFILE_SCRIPT, str(dest), str(PROFILE_TOP)]
                               + [str(p) for p in bench.layers])


# =============================================================================
# 3. REPORT
# =============================================================================


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(bench: Bench, loadavg_before: Sequence[float]) -> Dict[str, Any]:
    """Returns the machine, tool versions and date the numbers belong to."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": bench.python,
        "python_version": bench.runner.output(
            [bench.python, "-c", "import sys; print(sys.version.split()[0])"]).strip(),
        "tar_version": bench.runner.output([bench.tar, "--version"]).splitlines()[0],
        "umoci_version": bench.runner.output([bench.umoci, "--version"]).strip(),
        "euid": os.geteuid(),
        "loadavg_before": list(loadavg_before),
        "loadavg_after": list(os.getloadavg()),
        "source": "zlayer_registry.py sha256:%s" % hashlib.sha256(
            (bench.work / "src" / "zlayer_registry.py").read_bytes()).hexdigest()[:12],
    }


def _filesystem(path: Path) -> str:
    """Returns the type of the filesystem ``path`` is on, from /proc/mounts."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                mount = fields[1]
                if str(path).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def summarize(samples: List[Dict[str, Step]]) -> Dict[str, Any]:
    """Returns medians, minimums and ratios (per round, then their median)."""
    out: Dict[str, Any] = {}
    for name, _fn in TOOLS:
        walls = [s[name].wall_s for s in samples]
        cpus = [s[name].cpu_s for s in samples]
        out[name] = {"wall_median_s": _median(walls), "wall_min_s": min(walls),
                     "cpu_median_s": _median(cpus),
                     "sys_median_s": _median([s[name].sys_s for s in samples]), "walls_s": walls}
    inside = [float(s["ours"].stdout) for s in samples]
    out["ours"]["inside_median_s"] = _median(inside)
    for other in ("tar", "umoci"):
        ratios = [s["ours"].wall_s / s[other].wall_s for s in samples]
        out["ours/" + other] = {
            "wall_ratio_median": _median(ratios),
            "wall_ratio_of_medians": out["ours"]["wall_median_s"] / out[other]["wall_median_s"],
            "cpu_ratio_of_medians": out["ours"]["cpu_median_s"] / out[other]["cpu_median_s"],
            "ratios": ratios,
        }
    return out


def format_report(bench: Bench, machine: Dict[str, Any], shape: Shape, level: int,
                  summary: Dict[str, Any], rounds: int, trees: str) -> str:
    """Returns the header, the table of times and the ratios."""
    compressed = sum(b.size for b in bench.info.layers)
    lines = [
        "zlayer_registry unpack benchmark, %s" % machine["date"],
        "machine:  %s CPUs, %s, Linux %s, euid %d" % (
            machine["nproc"], machine["cpu"], machine["kernel"], machine["euid"]),
        "load:     %s before, %s after (1/5/15 min; other work on the machine skews times)" % (
            "/".join("%.2f" % x for x in machine["loadavg_before"]),
            "/".join("%.2f" % x for x in machine["loadavg_after"])),
        "python:   %s (%s), %s" % (machine["python_version"], machine["python"], machine["source"]),
        "peers:    %s; %s" % (machine["tar_version"], machine["umoci_version"]),
        "image:    %s; %d gzip-%d layers, %.1f MiB compressed" % (
            shape.describe(), len(bench.info.layers), level, compressed / kit.MIB),
        "tree:     %s" % trees,
        "ours:     %s -c 'zr.LayerUnpacker(DEST).unpack_layers([LAYER, ...])' (fresh process,"
        " layer files of the layout)" % machine["python"],
        "tar:      tar -xzf LAYER -C DEST, per layer, in order",
        "umoci:    umoci unpack --rootless --image LAYOUT:%s BUNDLE" % TAG,
        "rounds:   %d timed after 1 warm-up; wall includes process start" % rounds,
        "workdir:  %s (%s)" % (bench.work, _filesystem(bench.work)),
        "",
        "%-34s %10s %10s %10s %10s" % ("step", "median", "min", "cpu med", "sys med"),
        "-" * 78,
    ]
    for name, _fn in TOOLS:
        row = summary[name]
        lines.append("%-34s %9.3fs %9.3fs %9.3fs %9.3fs" % (
            name, row["wall_median_s"], row["wall_min_s"], row["cpu_median_s"],
            row["sys_median_s"]))
    lines.append("%-34s %9.3fs" % ("ours, inside unpack_layers", summary["ours"]["inside_median_s"]))
    lines.append("")
    for other in ("tar", "umoci"):
        ratio = summary["ours/" + other]
        verdict = ""
        if other == "tar":
            verdict = "  target <= %.2f: %s" % (
                TARGET_TAR_RATIO,
                "PASS" if ratio["wall_ratio_median"] <= TARGET_TAR_RATIO else "MISS")
        lines.append("ours/%-6s wall %.2f (median of rounds: %s), of medians %.2f, cpu %.2f%s" % (
            other, ratio["wall_ratio_median"], " ".join("%.2f" % r for r in ratio["ratios"]),
            ratio["wall_ratio_of_medians"], ratio["cpu_ratio_of_medians"], verdict))
    return "\n".join(lines)


# =============================================================================
# 4. MAIN
# =============================================================================


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--small", action="store_true",
                        help="4 x 4 MiB and 1,000 small files, for a quick run")
    parser.add_argument("--pull-image", action="store_true",
                        help="the shape of bench/pull.py's image: 6 x 48 MiB and 10,000 "
                             "small files (use with --level 1, as that image is written)")
    parser.add_argument("--level", type=int, default=6, choices=range(1, 10),
                        help="gzip level of the layers (default 6)")
    parser.add_argument("--python", default=sys.executable, help="interpreter of ours")
    parser.add_argument("--profile", action="store_true",
                        help="also run ours once under cProfile and print the top entries")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the temporary directory goes (default: the system's; "
                             "/dev/shm takes the disk out of the numbers)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def prepare(args: argparse.Namespace, work: Path, runner: Runner, shape: Shape) -> Bench:
    tools = {}
    for name in ("tar", "umoci"):
        tools[name] = shutil.which(name)
        if tools[name] is None:
            raise BenchError("%s is not installed" % name)
    source = work / "src"
    source.mkdir()
    shutil.copy2(str(REPO_ROOT / "zlayer_registry.py"), str(source / "zlayer_registry.py"))
    (work / "out").mkdir()
    layout = work / "layout"
    started = time.perf_counter()
    info = build_layout(layout, shape, args.level)
    print("bench: image written in %.1fs" % (time.perf_counter() - started), file=sys.stderr)
    return Bench(runner, work, layout, info, kit.layer_blob_paths(layout, info),
                 args.python, tools["tar"], tools["umoci"])


def _child_env(work: Path) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(work / "src"), PYTHONDONTWRITEBYTECODE="1",
               HOME=str(work), LC_ALL="C")
    return env


def _raise_keyboard_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the benchmark; returns 0, 1 on a failed step, 130 on interrupt."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    shape = SMALL if args.small else PULL if args.pull_image else FULL
    work = Path(tempfile.mkdtemp(prefix="zlayer-bench-unpack-",
                                 dir=None if args.workdir is None else str(args.workdir)))
    (work / "logs").mkdir()
    runner = Runner(_child_env(work), work / "logs")
    try:
        bench = prepare(args, work, runner, shape)
        loadavg_before = os.getloadavg()
        samples = run_rounds(bench, args.rounds)
        trees = check_trees(bench)
        summary = summarize(samples)
        machine = machine_info(bench, loadavg_before)
        print(format_report(bench, machine, shape, args.level, summary, args.rounds, trees))
        if args.profile:
            print("\ncProfile of one run of ours:\n" + profile_ours(bench))
        if args.json:
            data = {"machine": machine, "shape": dataclasses.asdict(shape), "level": args.level,
                    "summary": summary}
            args.json.write_text(json.dumps(data, indent=2))
        return 0
    except BenchError as exc:
        print("bench: %s" % exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        runner.kill_live()
        if args.keep:
            print("bench: kept %s" % work, file=sys.stderr)
        else:
            kit.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
