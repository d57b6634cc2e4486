"""Writing tuned results: merged into the per-(op, backend, device, dtype, versions) JSON file
that ds_kernels.tuning reads, atomically and safely under concurrent sweeps.

Two sweeps may finish at once: each takes an exclusive lock on a sibling ".lock" file, reads
the current file (a corrupt one is reported and replaced), merges its entries, writes a
temporary file in the same folder and renames it over the old one, so a reader only ever sees
a complete file. Files are written readable by all (0644), as a shared cache would be.
"""

import fcntl
import json
import os
import tempfile
from pathlib import Path

from ds_kernels import tuning


def write(folder: Path, op: str, backend: str, device_name: str, dtype, versions: dict,
          entries: dict[str, dict[str, dict]], source: str) -> Path:
    """Merge ``entries`` ({shape key: {bucket: config}}) into the file for these keys."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / tuning.file_name(op, backend, device_name, dtype, versions)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = _read_or_empty(path)
        for shape_key, buckets in entries.items():
            current["entries"].setdefault(shape_key, {}).update(buckets)
        current.update(op=op, backend=backend, device_name=device_name,
                       dtype=str(dtype).replace("torch.", ""), versions=versions, source=source)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=path.name, suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            json.dump(current, out, indent=1, sort_keys=True)
        os.chmod(temporary, 0o644)  # mkstemp makes it 0600; other users' ds_kernels read it
        os.replace(temporary, path)
    tuning.forget_files()
    return path


def _read_or_empty(path: Path) -> dict:
    empty = {"format": tuning.FORMAT, "entries": {}}
    try:
        data = tuning.load_json(path)
    except FileNotFoundError:
        return empty
    except (OSError, ValueError) as error:
        print(f"autotune: cannot read {path} ({error}); replacing it")
        return empty
    if not (isinstance(data, dict) and data.get("format") == tuning.FORMAT
            and isinstance(data.get("entries"), dict)):
        print(f"autotune: {path} is not a format-{tuning.FORMAT} tuning file; replacing it")
        return empty
    return data
