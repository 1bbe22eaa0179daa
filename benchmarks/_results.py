"""Shared helpers of the benchmark suites: result records, atomic JSON files, summary tables.

A result file holds one part of one suite: its config and the sha256 of that config's canonical
JSON, the environment it ran in (git state, versions, CPU, threads) and the measurements. A part
is re-run only when its config hash changes (or when forced), so committed results stay stable.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import lorsum

__all__ = [
    "config_hash",
    "cpu_model",
    "environment",
    "git_state",
    "load_current",
    "make_record",
    "markdown_table",
    "time_stats",
    "write_json_atomic",
]

REPO_ROOT = Path(__file__).resolve().parents[1]


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys), the identity of a result."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def git_state(repo_root: Path = REPO_ROOT) -> dict[str, Any]:
    """``{"sha", "dirty"}`` of the checkout; ``sha`` is None before any commit or without git."""
    sha = _git(repo_root, "rev-parse", "HEAD")
    # Untracked files and earlier results do not change what ran; modified tracked code does.
    status = _git(
        repo_root,
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":!benchmarks/results",
    )
    return {"sha": sha, "dirty": None if status is None else bool(status)}


def _git(repo_root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=repo_root, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def cpu_model() -> str | None:
    """The first ``model name`` of /proc/cpuinfo (Linux), else whatever :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment(repo_root: Path = REPO_ROOT) -> dict[str, Any]:
    """Where a result came from: code version, library versions, machine and thread count."""
    return {
        "git": git_state(repo_root),
        "versions": {
            "lorsum": lorsum.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
    }


def make_record(
    *,
    suite: str,
    part: str,
    config: Mapping[str, Any],
    device: str,
    dtype: str,
    seeds: Sequence[int],
    wall_time_s: float,
    results: Any,
    summary: Any,
    notes: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One result file's content, in the layout every suite shares."""
    return {
        "suite": suite,
        "part": part,
        "config": dict(config),
        "config_hash": config_hash(config),
        "environment": environment(),
        "device": device,
        "dtype": dtype,
        "seeds": list(seeds),
        "wall_time_s": wall_time_s,
        "notes": dict(notes or {}),
        "results": results,
        "summary": summary,
    }


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON so that ``path`` is always either the old or the complete new file.

    The temp file lives in the target directory because ``os.replace`` is atomic only within one
    file system; fsync before the rename so a crash cannot leave a renamed but empty file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            os.fchmod(tmp.fileno(), 0o644)  # mkstemp makes it 0600; results are for sharing
            json.dump(data, tmp, indent=2)
            tmp.write("\n")
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a crash could otherwise undo it); best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory: the rename is still atomic
    finally:
        os.close(fd)


def load_current(path: Path, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record at ``path`` if it was made with ``config`` (same hash), else None."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("config_hash") != config_hash(config):
        return None
    return record


def time_stats(times_s: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of repeated timings, with the raw values kept for later analysis."""
    return {
        "median_s": statistics.median(times_s),
        "min_s": min(times_s),
        "max_s": max(times_s),
        "repeats": len(times_s),
        "times_s": list(times_s),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; cells are already formatted strings."""
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def current_rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark, ``VmHWM`` of /proc/self/status.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: the kernel folds the pre-exec high-water mark into
    it, and ``subprocess`` launches the child by vfork + exec from the parent, so a child's
    ru_maxrss starts at the (large) peak of the benchmark process that spawned it.
    """
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux ≥ 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True
