"""Batch jobs (``mmalign score``, ``mmalign label``) split across the processes of ``torchrun`` or
``accelerate launch``: which process does what, per-process part files, and their merge into the one output.

- Slices: the launcher's ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` say who this process is. The job's whole
  input list (the same on every process, checked) is cut into blocks and block ``b`` belongs to process
  ``b % WORLD_SIZE``. Ownership depends only on an item's position in that list, never on what is already done,
  so processes need not agree on progress, and a re-run on another process count just re-slices.
- Part files: each process appends its results to ``OUT.parts/rank-R-of-W.jsonl`` and flushes as it goes. A
  process killed mid-write leaves at most a torn last line: readers count only newline-terminated lines, and the
  owner cuts the torn tail before it appends again. Parts of any earlier run (any process count) stay valid:
  every process reads them all as done (``label`` only those of the same settings).
- Merge: when every process has finished its slice, process 0 merges all part files into the output through a
  temporary file and ``os.replace`` (a reader sees the old output or the whole new one), then deletes the parts.
  A kill between the two leaves parts whose rows are already in the output; the job's merge skips rows the output
  holds, so merging twice never duplicates.

Coordination is one gloo process group (CPU sockets, whatever the device), used for three small collectives: at
the start every process checks that all listed the same inputs; at the end the processes gather their counts,
which is the barrier before the merge, and wait once more for the merge, so that no process returns before the
output is whole. Why a process group rather than files alone: "every process of this launch has finished" cannot
be told from marker files, which a killed launch leaves behind looking the same; the launcher's rendezvous knows
its own processes. A process that finishes early waits at the gather (up to :data:`WAIT`); if one dies,
``torchrun`` / ``accelerate launch`` stops the others, and the parts stay for the re-run.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from .errors import MMAlignError

T = TypeVar("T")
PARTS_SUFFIX = ".parts"
WAIT = datetime.timedelta(hours=24)  # a finished process waits this long for the slowest at the final gather

__all__ = [
    "Group",
    "PartRow",
    "Shard",
    "close_part",
    "current_shard",
    "fingerprint",
    "open_part",
    "part_file",
    "part_rows",
    "parts_dir",
    "process_group",
    "remove_parts",
    "write_atomic",
]


@dataclass(frozen=True)
class Shard:
    """This process's place in the launch: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int, block: int = 1) -> bool:
        """Whether item ``index`` of the job's input list is this process's: blocks of ``block`` items go round
        the processes in turn (``block`` = the batch size keeps one process's batches those of a single run)."""
        return (index // max(1, block)) % self.world == self.rank

    def take(self, items: Sequence[T], block: int = 1) -> list[tuple[int, T]]:
        """This process's items as ``(index in items, item)``."""
        return [(index, item) for index, item in enumerate(items) if self.owns(index, block)]

    def device(self, device: str) -> str:
        """``cuda`` means this process's GPU (``cuda:LOCAL_RANK``) under a launcher; an explicit ``cuda:N`` or
        ``cpu`` is kept."""
        return f"cuda:{self.local_rank}" if self.distributed and device == "cuda" else device


def _env_int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise MMAlignError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def current_shard(environ: Mapping[str, str] | None = None) -> Shard:
    """The :class:`Shard` that ``torchrun`` / ``accelerate launch`` describe in ``WORLD_SIZE``, ``RANK`` and
    ``LOCAL_RANK``; one process of one when ``WORLD_SIZE`` is not set."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return Shard()
    world = _env_int(environ, "WORLD_SIZE")
    if "RANK" not in environ:
        raise MMAlignError(f"WORLD_SIZE={world} is set but RANK is not; launch with torchrun or accelerate launch")
    rank = _env_int(environ, "RANK")
    if world < 1 or not 0 <= rank < world:
        raise MMAlignError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    local_rank = _env_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
    return Shard(rank, world, local_rank)


def fingerprint(value: Any) -> str:
    """A short stable digest of a JSON-serialisable value (a job's inputs and settings)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Part files
# ----------------------------------------------------------------------------------------------------------
def parts_dir(out: str | os.PathLike) -> Path:
    """Where the processes of a job writing ``out`` keep their part files: ``OUT.parts/``."""
    return Path(str(out) + PARTS_SUFFIX)


def part_file(out: str | os.PathLike, shard: Shard) -> Path:
    return parts_dir(out) / f"rank-{shard.rank:05d}-of-{shard.world:05d}.jsonl"


@dataclass(frozen=True)
class PartRow:
    """One complete line of a part file: where it is, its parsed value and its exact bytes."""

    path: Path
    line: int
    row: Any
    raw: bytes


def _complete_lines(path: Path) -> tuple[list[PartRow], int]:
    """The newline-terminated JSON lines of ``path`` and the byte length they span; an unterminated last line is
    a torn write (or one still being written by its owner) and is left out. A terminated line that is not JSON
    raises, naming the file and line."""
    data = path.read_bytes()
    rows, end = [], 0
    for number, line in enumerate(data.splitlines(keepends=True), start=1):
        if not line.endswith(b"\n"):
            break
        try:
            rows.append(PartRow(path, number, json.loads(line), line))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise MMAlignError(
                f"{path}: line {number} is not valid JSON ({error}); move the file aside and re-run"
            ) from None
        end += len(line)
    return rows, end


def part_rows(out: str | os.PathLike) -> list[PartRow]:
    """Every complete line of every part file of ``out`` (any process count), by file name then line."""
    folder = parts_dir(out)
    if not folder.is_dir():
        return []
    rows: list[PartRow] = []
    for path in sorted(folder.glob("rank-*-of-*.jsonl")):
        rows.extend(_complete_lines(path)[0])
    return rows


def open_part(out: str | os.PathLike, shard: Shard) -> IO[str]:
    """This process's part file, opened for appending after cutting a torn last line left by a killed run
    (only the owner writes or cuts a part file)."""
    path = part_file(out, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        end = _complete_lines(path)[1]
        if end < path.stat().st_size:
            with path.open("r+b") as handle:
                handle.truncate(end)
    return path.open("a", encoding="utf-8")


def close_part(handle: IO[str]) -> None:
    """Flush a part file to disk before this process reports its slice finished."""
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def write_atomic(path: str | os.PathLike, chunks: Iterable[bytes]) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, synced, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.merging")
    with tmp.open("wb") as handle:
        for chunk in chunks:
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    try:
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a platform without directory descriptors: the rename is done, only not yet synced
        return
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def remove_parts(out: str | os.PathLike) -> None:
    """Delete the part files of ``out`` once their rows are in the output."""
    shutil.rmtree(parts_dir(out), ignore_errors=True)


def job_rows(out: str | os.PathLike, job: str) -> list[PartRow]:
    """The part-file rows of ``out`` written by ``job`` (rows ``{"job": ..., ...}``, as label and generate write
    them), with their file and line for error messages."""
    return [part for part in part_rows(out) if isinstance(part.row, dict) and part.row.get("job") == job]


def drop_other_jobs(out: str | os.PathLike, job: str) -> None:
    """Delete ``out``'s part files when any row is not ``job``'s: a killed run with other settings may have
    overwritten the files this job's rows point to, so none of them can be trusted."""
    if any(not isinstance(part.row, dict) or part.row.get("job") != job for part in part_rows(out)):
        remove_parts(out)


# ----------------------------------------------------------------------------------------------------------
# The processes of one launch
# ----------------------------------------------------------------------------------------------------------
class Group:
    """The processes of one launch, for the job's two collectives (one process: no communication)."""

    def __init__(self, shard: Shard, group: Any = None):
        self.shard, self._group = shard, group

    def gather(self, value: T) -> list[T]:
        """Every process's ``value``, in rank order, on every process; also a barrier."""
        if not self.shard.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.shard.world
        try:
            dist.all_gather_object(values, value, group=self._group)
        except RuntimeError as error:
            raise MMAlignError(
                f"process {self.shard.rank} of {self.shard.world} lost the other processes ({error}); the finished "
                "work is kept in the part files; re-run the same command to finish and merge it"
            ) from None
        return values

    def check_same(self, value: str, what: str) -> None:
        """Fail on every process unless all computed the same ``value`` (e.g. a fingerprint of the input list)."""
        values = self.gather(value)
        differing = [rank for rank, other in enumerate(values) if other != values[0]]
        if differing:
            raise MMAlignError(
                f"the processes disagree on {what} (process {differing[0]} differs from process 0); "
                "did the inputs change while the job started?"
            )


@contextmanager
def process_group(shard: Shard) -> Iterator[Group]:
    """A gloo group over the launch's processes (the default group when one exists, e.g. under accelerate;
    a gloo group is created for it when that one is not gloo), torn down on exit if made here."""
    if not shard.distributed:
        yield Group(shard)
        return
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise MMAlignError(
                f"WORLD_SIZE={shard.world} but {' and '.join(missing)} not set; launch with torchrun or accelerate "
                "launch"
            )
        dist.init_process_group("gloo", rank=shard.rank, world_size=shard.world, timeout=WAIT)
        created = True
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=WAIT)
    try:
        yield Group(shard, group)
    finally:
        if created:
            dist.destroy_process_group()
