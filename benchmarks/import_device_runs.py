"""Bring run files made on a leased GPU machine into ``benchmarks/results``, with their commit.

A lease runs ``lorsum compare`` from a copy of the working tree, where git may report a stale
commit (the copy's ``.git`` is not this checkout's). ``benchmarks/lease/lease.sh`` sends back a
``runs.tgz`` of the files it wrote, relative to the results folder; this command extracts it,
writing every file atomically, and replaces each run's ``environment.git`` with the commit the
lease was started from, with a note saying so::

    python -m benchmarks.import_device_runs runs.tgz --sha "$(git rev-parse HEAD)" \\
        --card "NVIDIA H100"

A file that would leave the results folder (an absolute path, ``..``) or that is not JSON is
refused, and so is a run file that would replace a stored run of another config (the same rule
as ``lorsum compare``; ``--force`` replaces it).
"""

from __future__ import annotations

import argparse
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from benchmarks import _cli, _results
from benchmarks.compare import conflicting_run

__all__ = ["import_runs", "main"]

RESULTS = Path(__file__).resolve().parent / "results"


def import_runs(
    archive: Path, *, sha: str, card: str, results: Path = RESULTS, force: bool = False
) -> list[Path]:
    """Extract ``archive`` (a tar, optionally gzipped) into ``results``; the files written.

    Raises:
        UserError: a member outside ``results``, not JSON, or a run of another config where one
            is stored (without ``force``). Nothing is written then.
    """
    records: list[tuple[Path, Any]] = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isdir():
                continue
            name = PurePosixPath(member.name)
            if not member.isfile() or name.is_absolute() or ".." in name.parts:
                raise _cli.UserError(f"{archive}: {member.name!r} would leave the results folder")
            source = tar.extractfile(member)
            try:
                data = json.load(source) if source is not None else None
            except ValueError as error:
                raise _cli.UserError(f"{archive}: {member.name} is not JSON ({error})") from None
            records.append((results / Path(*name.parts), data))
    note = (
        f"run on a leased GPU machine ({card}) from a copy of this commit's working tree; the "
        "machine's git did not know the commit, so it was recorded when the files came back"
    )
    for path, data in records:
        if not isinstance(data, dict) or "config" not in data:
            continue  # a summary: no run identity, no environment
        if not force:
            _check_not_replacing(path, data["config"])
        if isinstance(data.get("environment"), dict):
            data["environment"]["git"] = {"sha": sha, "dirty": False, "note": note}
    for path, data in records:
        _results.write_json_atomic(path, data)
    return [path for path, _ in records]


def _check_not_replacing(path: Path, config: dict[str, Any]) -> None:
    details = conflicting_run(path, config)
    if details is not None:
        raise _cli.UserError(f"{path} holds a run of another config ({details}); pass --force")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.import_device_runs",
        description="Extract run files made on a leased GPU machine into benchmarks/results, "
        "recording the commit the lease ran.",
    )
    parser.add_argument("archives", type=Path, nargs="+", help="runs.tgz files from a lease")
    parser.add_argument("--sha", required=True, help="the commit whose working tree the lease ran")
    parser.add_argument("--card", required=True, help='the GPU, e.g. "NVIDIA H100"')
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where to extract (default: the results)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace stored runs of another config"
    )
    args = parser.parse_args(argv)
    try:
        for archive in args.archives:
            written = import_runs(
                archive, sha=args.sha, card=args.card, results=args.results, force=args.force
            )
            print(f"{archive}: {len(written)} files into {args.results}")
    except (_cli.UserError, OSError, tarfile.TarError) as error:
        return _cli.fail(parser.prog, error)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
