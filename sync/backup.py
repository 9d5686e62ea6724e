"""Backups of a running agent's or coordinator's SQLite data, and their restore.

A backup is one gzip'd tar file, mode 0600: `manifest.json` first (format, kind, when,
device or coordinator id, each member's size, SHA-256 and, for a database, its schema),
then the members. A SQLite database is copied with SQLite's online backup API
(`sqlite3.Connection.backup`, all pages in one step, so one read transaction: a consistent
snapshot of everything committed before it began, taken while the service keeps writing;
WAL readers never block the writer) into a single self-contained file. Other files (the
agent's registered topologies and the settings its coordinator set) are copied as they are;
they are replaced atomically by their writer, so each copy is whole.

A restore extracts into a staging directory beside the target, checks every member's
hash, runs `PRAGMA integrity_check` and checks each database's schema against what this
code knows, and only then takes the data's lock (`datalock`, refused while the service
runs) and swaps the staged files in. What it replaces is moved aside into
`pre-restore-<time>/` beside the target, never deleted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from dgdm.sync import migrations_sqlite, wallclock
from dgdm.sync.errors import SyncError
from dgdm.sync.migrations import checked

FORMAT = "dgdm-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FILE_MODE = 0o600
GZIP_LEVEL = 1  # SQLite pages compress well even so; a large store is not slowed by level 9
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
CHUNK = 1 << 20


class BackupError(SyncError):
    """A backup cannot be written, or a file is not a backup this code can restore (exit 1)."""


# -- schemas ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schema:
    """What a database must look like to be restored: its tables, and its schema version
    as `version(conn)` reads it, raising `SyncError` when this code does not know it (a
    newer release wrote it)."""

    name: str
    tables: tuple[str, ...]
    version: Callable[[sqlite3.Connection], int]
    advance: str  # SQL run on the restored copy with the seq floor (see `seq_floor`)


def _outbox_version(conn: sqlite3.Connection) -> int:
    from dgdm.sync.outbox import schema_version

    return schema_version(conn)  # either bookkeeping: a backup of an older release too


def _store_version(conn: sqlite3.Connection) -> int:
    from dgdm.sync.coordinator.migrations import MIGRATIONS

    return checked(migrations_sqlite.version(conn), MIGRATIONS)


# A restore puts the data back at an earlier point, but seqs are never reused (SPEC §6): the
# device's messages sent after the backup are stored at the coordinator under their seqs
# (a reused one would be dropped as a duplicate), and a command seq the device already
# executed would be refused as a replay. So the restored counters jump to at least
# `seq_floor`: Unix milliseconds x 1000, above any seq handed out before (fewer than 1000
# per millisecond) as long as the clock is roughly right.
OUTBOX = Schema(
    "outbox",
    ("messages", "counters", "state"),
    _outbox_version,
    "INSERT INTO counters (name, value) VALUES ('next_seq', :floor)"
    " ON CONFLICT (name) DO UPDATE SET value = max(value, :floor)",
)
COORDINATOR = Schema(
    "coordinator",
    ("devices", "messages", "commands", "schema_version"),
    _store_version,
    "UPDATE devices SET down_seq = max(down_seq, :floor)",
)
SCHEMAS = {s.name: s for s in (OUTBOX, COORDINATOR)}


# -- what a backup holds ------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One top-level entry of a backup: a SQLite database (`schema` set), one plain file
    (`plain_file`) or a directory of plain files; `path` is where it lives, on backup and on
    restore. A database or file that does not exist is not held, so a restore leaves
    whatever is at its path."""

    name: str
    path: Path
    schema: Schema | None = None
    plain_file: bool = False


def create(out: Path, kind: str, parts: Sequence[Part], info: Mapping[str, Any]) -> dict[str, Any]:
    """Write the backup of `parts` to `out` (replaced atomically); returns its manifest."""
    out = Path(out)
    if out.is_dir():
        raise BackupError(f"--out {out} is a directory: name the backup file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with scratch(out.parent, ".dgdm-backup-") as staging:
        files, held = _stage(staging, parts)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "created_ms": wallclock.now_ms(),
            **info,
            "parts": held,
            "files": files,
        }
        _write_archive(out, staging, manifest)
    return manifest


def _stage(staging: Path, parts: Sequence[Part]) -> tuple[list[dict[str, Any]], list[str]]:
    files: list[dict[str, Any]] = []
    held: list[str] = []
    for part in parts:
        if part.schema is not None:
            if not part.path.is_file():
                continue  # never created (an agent without an outbox): nothing to hold
            entry = snapshot(part.path, staging / part.name, part.schema)
            files.append({"name": part.name, **entry})
        elif part.plain_file:
            copied = _copy_file(part.path, staging, part.name)
            if copied is None:
                continue  # never written (an agent never sent set_config): nothing to hold
            files.append(copied)
        else:
            files += _copy_dir(part.path, staging, part.name)
        held.append(part.name)
    return files, held


def snapshot(source: Path, dest: Path, schema: Schema) -> dict[str, Any]:
    """A consistent copy of a live SQLite database by the online backup API."""
    try:
        src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            dst = sqlite3.connect(dest)
            try:
                src.backup(dst)  # pages=-1: one step, one read transaction, one snapshot
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
                version = _checked(dst, schema, str(source))
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise BackupError(f"cannot back up {source}: {exc}") from exc
    return {**_digest(dest), "schema": schema.name, "schema_version": version}


def _copy_dir(folder: Path, staging: Path, name: str) -> list[dict[str, Any]]:
    files: list[dict[str, Any]] = []
    target = staging / name
    target.mkdir()
    if not folder.is_dir():
        return files
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue  # a writer's temporary file, or anything not plain
        copied = _copy_file(path, staging, f"{name}/{path.name}")
        if copied is not None:
            files.append(copied)
    return files


def _copy_file(source: Path, staging: Path, name: str) -> dict[str, Any] | None:
    """The manifest entry of `source` copied to `staging / name`; None if there is none."""
    try:
        shutil.copyfile(source, staging / name)
    except FileNotFoundError:  # never written, or deleted meanwhile: not held
        return None
    return {"name": name, **_digest(staging / name)}


def _write_archive(out: Path, staging: Path, manifest: dict[str, Any]) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # an older tmp file keeps its mode through O_CREAT
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:gz", compresslevel=GZIP_LEVEL) as tar:
                data = json.dumps(manifest, indent=1, sort_keys=True).encode()
                header = tarfile.TarInfo(MANIFEST)
                header.size, header.mtime, header.mode = len(data), time.time(), FILE_MODE
                tar.addfile(header, io.BytesIO(data))
                for entry in manifest["files"]:
                    tar.add(staging / entry["name"], arcname=entry["name"], recursive=False)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(out.parent)


# -- restore ------------------------------------------------------------------------------


def read(path: Path, kind: str, staging: Path) -> dict[str, Any]:
    """Extract and verify a backup into `staging`; returns its manifest. Raises
    `BackupError` naming what is wrong: not a backup, truncated, a hash that does not
    match, a database that fails `PRAGMA integrity_check`, a schema this code does not know.
    """
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            manifest = _manifest(tar, path, kind)
            for entry in manifest["files"]:
                _extract(tar, entry, staging)
            for name in manifest["parts"]:
                if _is_dir_part(manifest, name):  # a directory, perhaps held empty
                    (staging / name).mkdir(exist_ok=True)
    except (
        tarfile.TarError,
        zlib.error,
        EOFError,
        OSError,
        ValueError,
        KeyError,
        TypeError,
    ) as exc:
        raise BackupError(f"{path} is not a readable dgdm backup ({_reason(exc)})") from None
    for entry in manifest["files"]:
        if entry.get("schema") is not None:
            check_database(staging / entry["name"], SCHEMAS[entry["schema"]], str(path))
    return manifest


def seq_floor(now_ms: int | None = None) -> int:
    return (wallclock.now_ms() if now_ms is None else now_ms) * 1000


def advance_seqs(staging: Path, manifest: Mapping[str, Any], floor: int) -> None:
    """Move the staged databases' seq counters up to `floor` (see OUTBOX)."""
    for entry in manifest["files"]:
        if entry.get("schema") is None:
            continue
        conn = sqlite3.connect(staging / entry["name"], isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(SCHEMAS[entry["schema"]].advance, {"floor": floor})
        finally:
            conn.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, EOFError | tarfile.ReadError) or "truncat" in str(exc).lower():
        return f"truncated or corrupt: {exc}" if str(exc) else "truncated"
    return str(exc) or type(exc).__name__


def _manifest(tar: tarfile.TarFile, path: Path, kind: str) -> dict[str, Any]:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isfile():
        raise BackupError(f"{path} is not a dgdm backup (no {MANIFEST} first)")
    handle = tar.extractfile(first)
    assert handle is not None  # a regular file
    manifest = json.loads(handle.read())
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{path} is not a dgdm backup")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BackupError(
            f"{path} is a backup of format {manifest.get('format_version')}, "
            f"this dgdm-edge reads {FORMAT_VERSION}"
        )
    if manifest.get("kind") != kind:
        raise BackupError(f"{path} is a backup of a {manifest.get('kind')}, not of a {kind}")
    for entry in manifest["files"]:
        _safe_name(entry["name"])
        if entry.get("schema") is not None and entry["schema"] not in SCHEMAS:
            raise BackupError(f"{path}: {entry['name']} has an unknown schema {entry['schema']}")
    for name in manifest["parts"]:
        _safe_name(name)
    return manifest


def _is_dir_part(manifest: dict[str, Any], name: str) -> bool:
    return not any(e["name"] == name for e in manifest["files"])


def _safe_name(name: Any) -> None:
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or len(parts) > 2 or any(p in ("", ".", "..") for p in parts) or name[0] == "/":
        raise BackupError(f"the backup names an unsafe path {name!r}")


def _extract(tar: tarfile.TarFile, entry: dict[str, Any], staging: Path) -> None:
    name = entry["name"]
    member = tar.getmember(name)
    handle = tar.extractfile(member) if member.isfile() else None
    if handle is None:
        raise BackupError(f"the backup's {name} is not a regular file")
    dest = staging / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as out:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != entry["sha256"] or dest.stat().st_size != entry["bytes"]:
        raise BackupError(f"the backup's {name} does not match its SHA-256: the file is corrupt")


def check_database(path: Path, schema: Schema, where: str) -> Any:
    """`PRAGMA integrity_check`, the tables and the schema version; returns the version."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return _checked(conn, schema, where)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise BackupError(f"{where}: {path.name} is not a usable SQLite database: {exc}") from None


def _checked(conn: sqlite3.Connection, schema: Schema, where: str) -> Any:
    problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    if problems != ["ok"]:
        raise BackupError(
            f"{where}: the {schema.name} database fails its integrity check: "
            + "; ".join(problems[:3])
        )
    have = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    missing = [t for t in schema.tables if t not in have]
    if missing:
        raise BackupError(f"{where}: not a {schema.name} database (no table {missing[0]})")
    try:
        return schema.version(conn)
    except SyncError as exc:
        raise BackupError(f"{where}: the {schema.name} database has {exc}") from None


def install(staging: Path, parts: Sequence[Part], held: Sequence[str]) -> list[Path]:
    """Swap the staged parts in for the live ones; the live ones are moved into a
    `pre-restore-*` directory beside each (returned). The caller holds the data's lock."""
    aside: dict[Path, Path] = {}
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for part in parts:
        if part.name not in held:
            continue
        parent = part.path.parent
        old = [part.path, *(_side(part.path, s) for s in SQLITE_SIDE_FILES)]
        for item in (p for p in old if p.exists()):
            if parent not in aside:
                aside[parent] = _aside_dir(parent, stamp)
            os.replace(item, aside[parent] / item.name)
        parent.mkdir(parents=True, exist_ok=True)
        _move(staging / part.name, part.path)
        _fsync_dir(parent)
    return list(aside.values())


def _move(source: Path, dest: Path) -> None:
    try:
        os.replace(source, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.move(source, dest)  # the staging area is on another file system


def _aside_dir(parent: Path, stamp: str) -> Path:
    folder = parent / f"pre-restore-{stamp}"
    n = 0
    while folder.exists():
        n += 1
        folder = parent / f"pre-restore-{stamp}-{n}"
    folder.mkdir(mode=0o700)
    return folder


def _side(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


# -- helpers ------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch(parent: Path, prefix: str) -> Iterator[Path]:
    """A private temporary directory under `parent` (same file system: renames are atomic),
    removed at the end."""
    if not parent.exists():  # a new data dir is private, like the services make theirs
        parent.mkdir(parents=True)
        os.chmod(parent, 0o700)
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def summary(manifest: Mapping[str, Any], out: Path) -> str:
    """One line for the operator: what the backup holds (no contents, no secrets)."""
    held = ", ".join(_describe(manifest, name) for name in manifest["parts"]) or "nothing"
    return f"backed up {held} to {out} ({out.stat().st_size} bytes, mode 0600)"


def restored(manifest: Mapping[str, Any], source: Path, aside: Sequence[Path]) -> str:
    held = ", ".join(_describe(manifest, name) for name in manifest["parts"]) or "nothing"
    moved = f"; the data it replaced is in {', '.join(map(str, aside))}" if aside else ""
    return f"restored {held} from {source} (backup of {manifest['created_ms']} ms){moved}"


def _describe(manifest: Mapping[str, Any], name: str) -> str:
    for entry in manifest["files"]:
        if entry["name"] == name and entry.get("schema") is None:
            return name  # one plain file
        if entry["name"] == name:
            version = entry["schema_version"]
            shown = version[-1] if isinstance(version, list) and version else version
            return f"{name} (schema {shown})"
    count = sum(1 for e in manifest["files"] if e["name"].startswith(name + "/"))
    return f"{name}/ ({count} files)"
