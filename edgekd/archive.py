"""Tar and zip archives of an ImageFolder (data.source: set.tar.gz, set.zip): read in place, or
extracted once.

Extracting writes one file per image, and on a small-image dataset creating the files is what
costs: CIFAR-10's 60 000 JPEGs took most of a minute to unpack and under two seconds to read as
one stream (benchmarks/README.md). So an archive no larger than IN_MEMORY_BYTES is read in one
pass into memory (`read_archive`) and the ImageFolder reader walks it through `ArchiveEntry`, a
stand-in for the few `Path` methods it uses; a larger one is extracted into the cache once,
keyed on its bytes (`extract_archive`), so RAM use does not grow with the dataset. Both read the
same members with the same checks (`Budget`), and the decoded splits are keyed on the image
bytes either way, so the two give the same cache entries.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from .errors import EdgekdError, InputError
from .fileio import sha256_file
from .schema import ArchiveLimits

ARCHIVES = (".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tar", ".zip")  # what tarfile ("r:*") and zipfile read
READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError,
               OSError, EOFError, zlib.error)  # RuntimeError, NotImplementedError: zipfile's encrypted or unknown-method members
IN_MEMORY_BYTES = 1 << 30  # archives up to this size (and their members' bytes) are read into memory, larger extracted


class Budget:
    """Checked on each member's header before its bytes are read: tarfile's "data" filter (no
    traversal, links or devices) plus limits on the total unpacked size and member count, and,
    where the members are written to disk, the free space there."""

    SLACK = 64 << 20

    def __init__(self, archive: Path, limits: ArchiveLimits, dest: Path | None):
        self.archive, self.files, self.bytes = archive, 0, 0
        by_ratio = int(limits.max_ratio * archive.stat().st_size) + self.SLACK
        self.max_bytes = min(by_ratio, limits.max_bytes or by_ratio)
        self.free = shutil.disk_usage(dest).free if dest else None
        self.max_files = limits.max_files

    def __call__(self, member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        """tarfile's extraction filter."""
        member = tarfile.data_filter(member, path)
        self.admit(member.name, member.size)
        return member

    def admit_zip(self, info: zipfile.ZipInfo) -> str:
        """A zip member's path as the tree keys it, once admitted. zipfile reads a member's
        declared size and no more, so the budget holds before anything is inflated. It writes a
        link as a file holding the target's name, so a link is refused by name, as is a path
        that leaves the archive (zipfile's extract would strip it silently)."""
        rel = _normal(info.filename)
        if os.path.isabs(info.filename) or rel == ".." or rel.startswith("../"):
            raise InputError(f"{self.archive}: member {info.filename!r} points outside the archive; refused")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise InputError(f"{self.archive}: member {info.filename!r} is a symbolic link, which a zip cannot hold "
                             "portably; replace it by the file")
        self.admit(info.filename, info.file_size)
        return rel

    def admit(self, name: str, size: int) -> None:
        self.files += 1
        self.bytes += size
        if self.files > self.max_files:
            raise InputError(f"{self.archive}: more than data.archive.max_files ({self.max_files:,}) members; "
                             "raise it if the archive is trusted")
        if self.bytes > self.max_bytes:
            raise InputError(f"{self.archive}: unpacks to more than {self.max_bytes:,} bytes (at {name}), over "
                             "data.archive.max_ratio / max_bytes; refused as an archive bomb (raise them if it is trusted)")
        if self.free is not None and self.bytes > self.free:
            raise EdgekdError(f"{self.archive}: unpacks to more than the {self.free:,} bytes free in the cache "
                              f"({name}); free space or set data.cache_dir")


def open_archive(archive: Path, cache: Path, limits: ArchiveLimits) -> Path | ArchiveEntry:
    """The archive's top folder: read into memory where it is small enough, else extracted."""
    return (archive.stat().st_size <= IN_MEMORY_BYTES and read_archive(archive, limits)) or \
        extract_archive(archive, cache, limits)


# ----------------------------------------------------------------------------- read in place


class _Tree:
    """The archive's files (bytes) and folders (children), keyed by normalised member path as a
    string ("" for the top): plain strings, as `PurePosixPath` keys cost more than reading the
    archive on a small-image dataset."""

    def __init__(self, archive: Path):
        self.archive = archive
        self.files: dict[str, bytes] = {}
        self.children: dict[str, set[str]] = {"": set()}

    def add(self, rel: str, data: bytes | None) -> None:
        """A file (data) or folder (None) and every folder above it."""
        if data is not None:
            self.files[rel] = data
        elif rel not in self.children:
            self.children[rel] = set()
        node = rel
        while node:
            parent = node.rpartition("/")[0]
            if parent in self.children:
                self.children[parent].add(node)
                break  # the folders above it are known already
            self.children[parent] = {node}
            node = parent


class ArchiveEntry:
    """A file or folder inside an archive read into memory, answering the `Path` calls the
    ImageFolder reader makes (data._find_split_dir, _list_image_folder, _load_image_folder) as
    `Path` answers them for the extracted folder, so both give the same files in the same order.
    It prints as `<archive>/<member>`, so messages name the image inside the archive."""

    def __init__(self, tree: _Tree, rel: str = ""):
        self._tree, self.rel = tree, rel

    @property
    def name(self) -> str:
        return self.rel.rpartition("/")[2]

    @property
    def parent(self) -> ArchiveEntry:
        return ArchiveEntry(self._tree, self.rel.rpartition("/")[0])

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix if "." in self.name else ""

    def __truediv__(self, part: str) -> ArchiveEntry:
        return ArchiveEntry(self._tree, _normal(f"{self.rel}/{part}"))

    def __str__(self) -> str:
        return f"{self._tree.archive}/{self.rel}" if self.rel else str(self._tree.archive)

    def __lt__(self, other: ArchiveEntry) -> bool:  # as Path orders: part by part
        return self.rel.split("/") < other.rel.split("/")

    def is_dir(self) -> bool:
        return self.rel in self._tree.children

    def is_file(self) -> bool:
        return self.rel in self._tree.files

    def iterdir(self) -> list[ArchiveEntry]:
        return [ArchiveEntry(self._tree, c) for c in self._tree.children.get(self.rel, ())]

    def rglob(self, pattern: str) -> list[ArchiveEntry]:
        if pattern != "*":
            raise ValueError("ArchiveEntry.rglob takes '*' only")
        out, todo = [], list(self._tree.children.get(self.rel, ()))
        while todo:
            node = todo.pop()
            out.append(ArchiveEntry(self._tree, node))
            todo.extend(self._tree.children.get(node, ()))
        return out

    def relative_to(self, other: ArchiveEntry) -> PurePosixPath:
        return PurePosixPath(self.rel).relative_to(other.rel or ".")

    def read_bytes(self) -> bytes:
        return self._tree.files[self.rel]


def _normal(member: str) -> str:
    """A member path as the tree keys it: normalised, relative, "" for the top."""
    rel = os.path.normpath(member.lstrip("/"))
    return "" if rel == "." else rel


def read_archive(archive: Path, limits: ArchiveLimits) -> ArchiveEntry | None:
    """The archive's top folder, every regular file's bytes read in one pass into memory; None
    where it holds links (extraction resolves them) or more than IN_MEMORY_BYTES of files."""
    budget, tree, held = Budget(archive, limits, None), _Tree(archive), 0
    nowhere = os.path.join(tempfile.gettempdir(), "edgekd-archive-check")  # members are checked as if extracted here
    try:
        if _is_zip(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    rel = budget.admit_zip(info)
                    if info.is_dir():
                        tree.add(rel, None)
                        continue
                    held += info.file_size
                    if held > IN_MEMORY_BYTES:
                        return None
                    tree.add(rel, zf.read(info))
            return ArchiveEntry(tree)
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                member = budget(member, nowhere)
                if member.issym() or member.islnk():
                    return None
                rel = _normal(member.name)
                if member.isdir():
                    tree.add(rel, None)
                elif member.isfile():
                    held += member.size
                    if held > IN_MEMORY_BYTES:
                        return None
                    tree.add(rel, tar.extractfile(member).read())
    except READ_ERRORS as e:
        raise InputError(f"{archive}: cannot read archive ({e})") from None
    return ArchiveEntry(tree)


def _is_zip(archive: Path) -> bool:
    return archive.name.lower().endswith(".zip")


def _extract_zip(archive: Path, dest: Path, budget: Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            budget.admit_zip(info)
            zf.extract(info, dest)


# ----------------------------------------------------------------------------- extracted once


def extract_archive(archive: Path, cache: Path, limits: ArchiveLimits) -> Path:
    """Extract an archive (any of ARCHIVES) once into the cache, keyed on the archive's bytes.

    Several processes may extract the same archive at once: each unpacks into its own temporary
    folder and publishes it with one rename; the first rename wins and the others drop their
    copy. A published folder is never deleted, since another process may be reading it."""
    digest = sha256_file(archive)[:20]
    parent = cache / "extracted"
    dest = parent / digest
    if (dest / ".complete").exists():
        return dest
    parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(parent, digest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.{os.getpid()}.", suffix=".tmp", dir=parent))
    try:
        if _is_zip(archive):
            _extract_zip(archive, tmp, Budget(archive, limits, parent))
        else:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter=Budget(archive, limits, parent))
        (tmp / ".complete").write_text(str(archive))
    except READ_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"{archive}: cannot extract archive ({e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _ in range(2):
        try:
            os.rename(tmp, dest)
            break
        except OSError:
            if (dest / ".complete").exists():  # another process published the same bytes first
                shutil.rmtree(tmp, ignore_errors=True)
                break
            try:  # an unfinished folder left by an edgekd that did not publish by rename
                aside = Path(tempfile.mkdtemp(prefix=f".{digest}.{os.getpid()}.", suffix=".tmp", dir=parent))
                os.replace(dest, aside)
                shutil.rmtree(aside, ignore_errors=True)
            except OSError:
                pass
    return dest


def _remove_orphans(parent: Path, digest: str) -> None:
    """Temporary folders of extractions whose process is gone (killed mid-way)."""
    for p in parent.glob(f".{digest}.*.tmp"):
        try:
            pid = int(p.name.split(".")[2])
            os.kill(pid, 0)
        except (ValueError, IndexError):
            continue
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue
