"""util.py: the few small rules that several files share, each written once.

Reading a JSON file with an error a user can act on, writing a folder so that it is never seen
half-written, and rounding up to a multiple. Nothing here knows about models or flags; every other
file may import it, and it imports none of them.
"""

import json
import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def read_json(path, error: type[Exception], want=dict, hint: str = "fix or re-create the file"):
    """The JSON value in `path`; a missing file, invalid JSON or a value that is not a `want`
    (dict, list or None for anything) raises `error` with the file, the line and what to do."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        raise error(f"{path} is not valid JSON ({where}); {hint}.") from None
    except RecursionError:
        raise error(f"{path} is nested too deeply to be read as JSON; {hint}.") from None
    if want is not None and not isinstance(value, want):
        raise error(f"{path} must hold a JSON {'object' if want is dict else want.__name__}, "
                    f"not {type(value).__name__}; {hint}.")
    return value


def save_safetensors(tensors: dict, path, metadata: dict | None = None):
    """safetensors' save_file, whose failures (a full disk, above all) are OSErrors, as they are:
    its own SafetensorError would end in a traceback where an OSError gets a clear message."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:
        raise OSError(f"could not write {path}: {str(e).splitlines()[0]}") from None


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple` (65 -> 128 for 64)."""
    return -(-n // multiple) * multiple


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return mask


def _follow_umask(folder: Path) -> None:
    """Give `folder` and what it holds the modes mkdir and open give: 0o777 and 0o666 less the
    umask. mkdtemp makes the folder owner-only, and a file copied with its mode or written by a
    library may be too, so another account (a serving user, a shared group) could not read it."""
    mask = _umask()
    for p in [folder, *folder.rglob("*")]:
        if not p.is_symlink():  # chmod would follow it to a file that is not ours
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_folder(final, replace: bool = False):
    """Write a folder so that `final` is either absent (or its old self) or complete.

    Yields a hidden temporary sibling `.NAME.tmp-PID-XXXXXXXX` to write into; when the block ends
    without an error its permissions are made to follow the umask and it is renamed to `final` in
    one step. On an error (Ctrl-C too) the temporary folder is removed and `final` is untouched; a
    process killed mid-write leaves only the hidden folder, whose pid tells remove_stale_temporaries
    that its writer is gone. With replace=True an existing `final` is moved aside to
    `.NAME.old-PID-XXXXXXXX` only then, put back if the rename fails or is interrupted, and deleted
    once the new folder is in place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-{os.getpid()}-"))
    try:
        yield tmp
        _follow_umask(tmp)
        old = _rename_into_place(tmp, final, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        _delete_replaced(old, final)


def _rename_into_place(tmp: Path, final: Path, replace: bool) -> Path | None:
    """Rename `tmp` to `final`; with `replace`, an existing `final` is moved aside first and put
    back if that fails, so one of the two is always whole at `final`. Returns where it went."""
    if not (replace and os.path.lexists(final)):
        tmp.rename(final)  # fails if `final` is a non-empty folder: never merged into one
        return None
    old = final.parent / f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        final.rename(old)
        tmp.rename(final)
    except BaseException:  # Ctrl-C too: the earlier folder goes back, not left hidden
        if os.path.lexists(old) and not os.path.lexists(final):
            old.rename(final)
        raise
    return old


def _delete_replaced(old: Path, final: Path) -> None:
    try:
        shutil.rmtree(old, ignore_errors=True)  # the new folder is in place: a failure here loses nothing
    except KeyboardInterrupt:  # say what is on disk: the caller would report 'nothing was written'
        raise KeyboardInterrupt(f"interrupted: {final} is complete; what is left of the folder it "
                                f"replaced, {old}, may be deleted.") from None


def _process_gone(pid: int, wrote_at: float) -> bool:
    """Whether the process `pid`, which last wrote at `wrote_at` (a file time), is gone: no process
    has this id (signal 0 only asks), or the one that has it started after that write. Ids are
    reused once they wrap around (at 32,768 by default, and every thread takes one), so a busy
    machine soon gives a killed writer's id to another process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # another user's process, or no valid pid: not ours to judge
        return False
    return _started_at(pid) > wrote_at


def _started_at(pid: int) -> float:
    """When process `pid` started, as a file time (Linux's /proc: its start in clock ticks after boot,
    the 22nd field of its stat line); 0.0 where it cannot be read, so that it counts as the writer."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0


def remove_stale_temporaries(final, is_ours=None) -> list[Path]:
    """Remove the hidden folders that a killed atomic_folder(final) left behind: the
    `.NAME.tmp-PID-XXXXXXXX` it was writing and the `.NAME.old-PID-XXXXXXXX` it was replacing (or
    deleting), and `.NAME.tmp-XXXXXXXX` from before the pid was in the name. Only when their
    process is gone and, when given, `is_ours(folder)` says the contents are the writer's own; a
    link or a file of such a name is kept. Returns the folders removed."""
    final = Path(final)
    name = re.compile(rf"\.{re.escape(final.name)}\.(tmp|old)-(?:(\d+)-)?[a-z0-9_]{{8}}")
    removed = []
    for p in (final.parent.iterdir() if final.parent.is_dir() else []):
        m = name.fullmatch(p.name)
        if not m or p.is_symlink() or not p.is_dir():
            continue
        # No pid: a .tmp written before the pid was in the name (a .old always has one).
        gone = _process_gone(int(m[2]), p.stat().st_mtime) if m[2] else m[1] == "tmp"
        if gone and (is_ours is None or is_ours(p)):
            shutil.rmtree(p, ignore_errors=True)  # cleaning up: a folder that cannot go blocks nothing
            removed += [] if p.exists() else [p]
    return removed


def short_list(items, n: int = 8) -> str:
    """'a, b, c and 5 more': the first n items of a list for an error message."""
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f" and {len(items) - n} more" if len(items) > n else "")


# ----------------------------------------------------------------------------------------------
# Checking the fields of a JSON file a run reads: each field's test and what it must be (null: unset)

is_text = lambda v: isinstance(v, str)
is_texts = lambda v: isinstance(v, str) or (isinstance(v, list) and all(map(is_text, v)))
is_whole = lambda v: isinstance(v, int) and not isinstance(v, bool)
is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
is_bool = lambda v: isinstance(v, bool)


def check_fields(path, values: dict, fields: dict, error: type, fix: str):
    """Each field of `values` that is set passes its test in `fields` ({name: (test, what it must be)}),
    else `error`: one paragraph naming the file, the field, what it holds and what it must be, then `fix`."""
    for name, (ok, expected) in fields.items():
        if values.get(name) is not None and not ok(values[name]):
            raise error(f"{path}: \"{name}\" is {json.dumps(values[name])}, but it must be {expected}. {fix}")
