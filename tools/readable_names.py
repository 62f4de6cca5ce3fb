"""Output file names that read back as written.

dataset.read_captions_csv normalises the filename column (whitespace runs become one space, the ends are
stripped, `./` and `//` collapse), so a name with a tab, a newline, a double or leading space would be written by
tools.prepare_data and then reported missing by the trainer. Such names are renamed on the way in: each path part
gets its whitespace normalised the reader's way (a part left empty or `.` goes, `..` becomes `_`), and a name that is
then taken gets `-2`, `-3`, ... before its extension. The mapping is written to OUT/renamed.json.
"""
import posixpath

from dataset import normalise_name

RECORD = "renamed.json"


def read_back(name):
    """`name` as dataset.read_captions_csv returns it from the filename column."""
    return normalise_name(" ".join(name.split()))


def _cleaned(name):
    parts = [" ".join(part.split()) for part in name.split("/")]
    # as normpath would: empty and `.` parts go; `..` would lead outside, and cannot be a name
    return "/".join("_" if part == ".." else part for part in parts if part not in ("", ".")) or "_"


def readable(names):
    """{old: new} for the names in `names` that would not read back as written; new names are unique among all."""
    taken = {name for name in names if read_back(name) == name}
    renamed = {}
    for name in sorted(set(names) - taken):  # sorted: the same input gives the same names
        base = _cleaned(name)
        stem, ext = posixpath.splitext(base)
        new, k = base, 1
        while new in taken:
            k += 1
            new = f"{stem}-{k}{ext}"
        taken.add(new)
        renamed[name] = new
    return renamed
