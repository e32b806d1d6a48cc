"""util.py: the few small rules that several files share, each written once.

Reading a JSON file with an error a user can act on, writing a folder so that it is never seen
half-written, and rounding up to a multiple. Nothing here knows about models or flags; every other
file may import it, and it imports none of them.
"""

import json
import os
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


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple` (65 -> 128 for 64)."""
    return -(-n // multiple) * multiple


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_folder(final, replace: bool = False):
    """Write a folder so that `final` is either absent (or its old self) or complete.

    Yields a hidden temporary sibling `.NAME.tmp-XXXX` to write into; when the block ends without
    an error it is renamed to `final` in one step (with replace=True an existing `final` is swapped
    out only then). On an error the temporary folder is removed and `final` is untouched; a process
    killed mid-write leaves only a hidden `.NAME.tmp-*`, never a half-written `final`. Permissions
    follow the umask, like any folder the user makes (mkdtemp alone would make it owner-only)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        tmp.chmod(0o777 & ~_umask())
        yield tmp
        if final.exists() and replace:
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)  # fails if `final` is a non-empty folder: never merged into one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(final):
    """Remove `.NAME.tmp-*` folders that a killed atomic_folder(final) left behind. Only for a
    folder that one process at a time writes (a run's checkpoints, a merge's output)."""
    final = Path(final)
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def short_list(items, n: int = 8) -> str:
    """'a, b, c and 5 more': the first n items of a list for an error message."""
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f" and {len(items) - n} more" if len(items) > n else "")
