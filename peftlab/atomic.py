"""Writing files and folders so that a reader never sees half of a save.

The standard POSIX recipe, in one place: write the new bytes under a temporary sibling
name, ``fsync`` the file, ``os.replace`` it onto the real name (atomic on POSIX and
Windows), then ``fsync`` the folder so that the rename itself survives a power cut. Temporary names carry :data:`TMP_MARK`, so whatever
a crash leaves behind is recognisable and removed by the next save into the same folder
(one writer per folder is assumed, as for any save path).

* :func:`write_file` / :func:`write_text` / :func:`write_json`: one file.
* :func:`replace_files`: a set of files in a folder (an adapter, a checkpoint step). A new
  folder is built aside and renamed into place in one step. An existing folder keeps every
  file that is not in the set; each file of the set is replaced by its own rename, in the
  given order, and if anything (an error, Ctrl-C) interrupts the renames, the files already
  replaced are put back. Only a hard kill between two of those renames (a few system calls
  apart, as every byte is already on disk) can leave old and new files side by side; callers make
  that detectable by writing one save id into every file (see ``io.py``, ``checkpoint.py``).

Files and folders are created with the default modes, so the umask decides (0644 / 0755
with the usual umask 022), as for any file a program writes; ``tempfile.mkstemp`` /
``mkdtemp`` would make them private (0600 / 0700) and unreadable to other users.
Used by ``peftlab.io.save_adapter`` and ``peftlab.checkpoint.save_checkpoint``.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["TMP_MARK", "fsync_file", "fsync_dir", "temp_path", "write_file", "write_text", "write_json",
           "replace_files", "remove_stale"]

TMP_MARK = ".peftlab-tmp-"  # in every temporary name: ".<final name>.peftlab-tmp-<32 hex digits>"

Writer = Callable[[Path], None]  # writes the complete file at the path it is given


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data to the disk (opened for writing: Windows cannot flush a read-only handle)."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of folder ``path`` (files created or renamed into it) durable.

    POSIX needs this after a rename; Windows cannot open a folder (and does not need it).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; nothing more can be done
        pass
    finally:
        os.close(fd)


def temp_path(final: str | os.PathLike) -> Path:
    """A fresh temporary sibling of ``final`` (hidden, recognisable by :data:`TMP_MARK`)."""
    final = Path(final)
    return final.parent / f".{final.name}{TMP_MARK}{uuid.uuid4().hex}"


def _write(path: Path, write: Writer) -> None:
    """Run ``write(path)``, give the file the mode any new file of this process gets, flush it.

    The mode is learnt by creating the file empty first (0o666 & ~umask), because some writers
    create theirs private: safetensors' ``save_file`` makes 0600 files, unreadable to other users.
    """
    with open(path, "xb"):
        pass
    mode = stat.S_IMODE(os.stat(path).st_mode)
    write(path)
    os.chmod(path, mode)
    fsync_file(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def remove_stale(folder: str | os.PathLike, prefixes: tuple[str, ...] | None = None) -> None:
    """Delete what crashed saves left in ``folder``, files and folders alike: every entry whose
    name holds :data:`TMP_MARK`, or, with ``prefixes``, only the entries whose name starts with
    one of them (for a shared folder, where other saves may be running)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.startswith(prefixes) if prefixes is not None else TMP_MARK in entry.name:
            _remove(entry)


def write_file(path: str | os.PathLike, write: Writer) -> Path:
    """Create or replace the file ``path`` atomically with what ``write(temp path)`` writes."""
    path = Path(path)
    tmp = temp_path(path)
    return _build_then_rename(tmp, path, lambda: _write(tmp, write), os.replace)


def _build_then_rename(tmp: Path, final: Path, build: Callable[[], None], rename) -> Path:
    """Run ``build()`` (which fills ``tmp``), then ``rename(tmp, final)``; on any failure remove
    ``tmp`` and re-raise. The rename is made durable (the parent folder is fsynced)."""
    try:
        build()
        rename(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(final.parent)
    return final


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_file(path, lambda p: p.write_text(text, encoding="utf-8"))


def _dump_json(obj: Any, **dump_kw: Any) -> Writer:
    def write(p: Path) -> None:
        with open(p, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, **dump_kw)
    return write


def write_json(path: str | os.PathLike, obj: Any, **dump_kw: Any) -> Path:
    """``json.dump(obj, **dump_kw)`` into ``path`` atomically."""
    return write_file(path, _dump_json(obj, **dump_kw))


def _keep_copy(final: Path) -> Path:
    """A second name for ``final``'s current contents, to put it back if the save is interrupted.

    A hard link costs nothing and leaves ``final`` in place; where links are not supported
    (FAT, some network shares), a copy does the same job.
    """
    backup = temp_path(final)
    try:
        os.link(final, backup)
    except OSError:
        shutil.copy2(final, backup)
    return backup


def new_folder(folder: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Create ``folder`` all or nothing: ``fill(build)`` writes into a temporary sibling, which is
    flushed and renamed into place. The rename fails (rather than merging) if ``folder`` exists."""
    folder = Path(folder)
    build = temp_path(folder)
    os.mkdir(build)  # mode 0o777 & ~umask, unlike tempfile.mkdtemp's 0o700

    def fill_and_flush() -> None:
        fill(build)
        for entry in build.iterdir():
            if entry.is_file():
                fsync_file(entry)
        fsync_dir(build)

    return _build_then_rename(build, folder, fill_and_flush, os.rename)


def _new_folder(folder: Path, files: Mapping[str, Writer | None]) -> None:
    def fill(build: Path) -> None:
        for name, write in files.items():
            if write is not None:
                _write(build / name, write)

    new_folder(folder, fill)


def replace_files(folder: str | os.PathLike, files: Mapping[str, Writer | None]) -> Path:
    """Write the files ``{name: writer}`` into ``folder`` (``None``: remove that file) safely.

    Other entries of ``folder`` are kept. Every file is first written completely and flushed
    under a temporary name; then the renames run in the order of ``files`` (put the file
    that "commits" the save last). See the module docstring for what an interrupt leaves.
    Returns ``folder``.
    """
    folder = Path(folder)
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        _new_folder(folder, files)
        return folder
    remove_stale(folder)
    staged: dict[str, Path] = {}  # name -> its new contents, complete and flushed
    undo: list[tuple[str, Path | None]] = []  # (name, copy of the old file or None if there was none)
    try:
        for name, write in files.items():
            if write is not None:
                staged[name] = temp_path(folder / name)
                _write(staged[name], write)
        for name, write in files.items():
            final = folder / name
            existed = final.exists()
            if write is None and not existed:
                continue
            undo.append((name, _keep_copy(final) if existed else None))
            if write is None:
                os.remove(final)
            else:
                os.replace(staged[name], final)
                del staged[name]  # only now: a failed rename leaves it to the clean-up below
    except BaseException:
        # put back what was already replaced, newest first; the old files are whole again
        for name, backup in reversed(undo):
            try:
                if backup is not None:
                    os.replace(backup, folder / name)
                    # a rename between two links of one file does nothing (POSIX): the old file was
                    # never replaced, and its spare link goes
                    _remove(backup)
                else:
                    _remove(folder / name)
            except OSError:
                pass  # the mixed state is still detectable by the callers' save id
        for tmp in staged.values():
            _remove(tmp)
        fsync_dir(folder)
        raise
    fsync_dir(folder)
    for _, backup in undo:
        if backup is not None:
            _remove(backup)
    return folder
