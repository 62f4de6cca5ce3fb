"""Seeded fuzzing of captions.csv files, one of the three places a user hands the project raw input
(see tests/fuzzing.py).

Each generator makes a fixed list of malformed inputs from one seed, so a failure names a case that comes back on
every run. Every outcome must be one a user can act on: accepted (and then checked for what it returned), a
one-line error, a counted skip, or an HTTP 4xx with a JSON `detail`; never a traceback and never a 5xx.
"""
import csv
import io
import os
import posixpath
import random

import pytest
from PIL import Image

from dataset import read_captions
from engine.errors import DataError
from tests.fuzzing import SEED, check_all, outcome
from tests.helpers import write_csv

# ---------------------------------------------------------------------- (a) captions.csv
# File names with what read_captions must make of them. "outside" names are refused whatever else the file holds.
NAMES = [("a.jpg", "ok"), ("b.png", "ok"), ("sub/c.jpg", "ok"), ("./a.jpg", "ok"), ("  a.jpg\t", "ok"),
         ("with,comma.jpg", "ok"), ("caf\u00e9 \u00fc.jpg", "ok"),
         ("nope.jpg", "missing"), ("A.JPG", "missing"), ("sub/", "missing"), ("~/a.jpg", "missing"),
         ("x" * 300 + ".jpg", "missing"), ("%2e%2e/a.jpg", "missing"),
         ("../a.jpg", "outside"), ("/etc/hostname", "outside"), ("a\\b.jpg", "outside"), ("sub/../../a.jpg", "outside"),
         ("", "outside"), ("..", "outside"), (".", "outside"), ("link.jpg", "outside"), ("C:\\x.jpg", "outside")]
OK_NAMES = [pick for pick in NAMES if pick[1] == "ok"]  # drawn more often, so that some files are accepted
CAPTIONS = ["a red circle", "", "   ", "x" * 5000, 'a "quoted" word', "line\nbreak", "nul\x00inside", "tab\tsep",
            "\u00e9moji \U0001F642", "comma, here", "=cmd()", "\u202eright to left"]
HEADERS = [(("filename", "caption"), True), (("caption", "filename"), True), (("filename", "caption", "extra"), True),
           (("Filename", "Caption"), False), (("filename",), False), (("file", "caption"), False), ((), False)]
FIELD_LIMIT = 131072  # csv's default field size limit: a longer caption is a CSV error naming the line
BYTES = [b"\x00", b'"', b"\xff", b"\xc3", b"\r", b"\n", b",", b"\xef\xbb\xbf", b"..", b"/", b"\\", b"\t", b"'"]


@pytest.fixture(scope="module")
def csv_root(tmp_path_factory):
    """A dataset folder whose images/ holds the "ok" names, and a link that points out of it."""
    root = tmp_path_factory.mktemp("fuzz-csv")
    for name in ("a.jpg", "b.png", "sub/c.jpg", "with,comma.jpg", "caf\u00e9 \u00fc.jpg"):
        path = root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    (root / "secret.jpg").write_bytes(b"not under images/")
    os.symlink(root / "secret.jpg", root / "images" / "link.jpg")
    return root


def norm(text):
    return " ".join(text.split())


def expected(header_ok, rows, labels):
    """What read_captions must do with rows written by csv.writer: ("error", substring) or ("ok", pairs, empties)."""
    if not header_ok:
        return "error", "must have the header"
    if any(len(c) > FIELD_LIMIT or len(n) > FIELD_LIMIT for n, c in rows):
        return "error", "is not valid CSV"
    rows = [(posixpath.normpath(norm(n)) if norm(n) else "", norm(c)) for n, c in rows]  # ./a.jpg is a.jpg
    first_label = {}
    for (name, _), label in zip(rows, labels, strict=True):
        first_label.setdefault(name, label)
    if "outside" in first_label.values():
        return "error", "leads outside"
    pairs = list(dict.fromkeys((n, c) for n, c in rows if c))
    if not pairs:
        return "error", "has no captioned rows"
    label = dict(zip((n for n, _ in rows), labels, strict=True))
    if any(label[n] == "missing" for n, _ in pairs):
        return "error", "missing from"
    return "ok", pairs, sum(1 for _, c in rows if not c)


def row_cases(rng, count):
    """Well-formed CSV files (csv.writer) of random rows: the exact result is known."""
    cases = []
    for i in range(count):
        header, header_ok = rng.choice(HEADERS) if rng.random() < 0.3 else HEADERS[0]
        picks = [rng.choice(OK_NAMES if rng.random() < 0.6 else NAMES) for _ in range(rng.randint(0, 6))]
        rows = [(name, rng.choice(CAPTIONS)) for name, _ in picks]
        labels = [label for _, label in picks]
        if rows and rng.random() < 0.3:  # an exact duplicate row
            j = rng.randrange(len(rows))
            rows.append(rows[j])
            labels.append(labels[j])
        if rng.random() < 0.05:
            rows.append(("a.jpg", "y" * (FIELD_LIMIT + 10)))
            labels.append("ok")
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        if header:
            writer.writerow(header)
        order = [header.index(c) if c in header else None for c in ("filename", "caption")]
        for row in rows:  # put each value under its column; "extra" gets a value too
            out = [""] * len(header)
            for value, col in zip(row, order, strict=True):
                if col is not None:
                    out[col] = value
            writer.writerow(out or row)
        data = buffer.getvalue().encode("utf-8")
        if rng.random() < 0.2:
            data = b"\xef\xbb\xbf" + data
        want = expected(header_ok and all(c in header for c in ("filename", "caption")), rows, labels)
        cases.append((f"rows #{i} {rows!r:.200}", (data, want)))
    return cases


def mutated_cases(rng, seeds, count):
    """Byte-level damage to well-formed files: only the kind of outcome is known."""
    cases = []
    for i in range(count):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            how, at = rng.randrange(5), rng.randint(0, len(data))
            if how == 0:
                data[at:at] = rng.choice(BYTES)
            elif how == 1 and data:
                data[min(at, len(data) - 1)] = rng.randrange(256)
            elif how == 2:
                del data[at:]
            elif how == 3:
                lines = bytes(data).split(b"\n")
                data = bytearray(b"\n".join(lines + [rng.choice(lines)]))
            else:
                lines = bytes(data).split(b"\n")
                data = bytearray(b"\n".join(lines[1:]))  # the header goes
        cases.append((f"mutated #{i} {bytes(data)[:120]!r}", (bytes(data), None)))
    return cases


def raw_cases(rng):
    fixed = [b"", b"\xef\xbb\xbf", b"filename,caption\n", b"filename,caption", b"\xef\xbb\xbffilename,caption\r\n",
             b"\n\n\n", b"\x00" * 10, b'"', b'filename,caption\n"a.jpg,a quote left open\nb.png,x\n',
             "filename,caption\na.jpg,caf\u00e9\n".encode("utf-16"), b"filename,caption\na.jpg,caf\xe9\n",
             b"sep=,\nfilename,caption\na.jpg,x\n", b"filename;caption\na.jpg;x\n",
             b"filename,caption,caption\na.jpg,x,y\n",
             b"filename,filename,caption\na.jpg,b.png,x\n", b"filename,caption\na.jpg\n", b"filename,caption\n,\n,\n",
             b"filename\x00,caption\na.jpg,x\n", b"filename,caption\na.jpg,\"x\"y\"\n"]
    randoms = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 400))) for _ in range(6)]
    return [(f"raw {d[:60]!r}", (d, None)) for d in fixed + randoms]


def test_fuzzed_captions_csv_is_read_or_refused_in_one_line(csv_root):
    rng = random.Random(SEED)
    rows = row_cases(rng, 75)
    cases = rows + mutated_cases(rng, [data for _, (data, _) in rows[:40]], 55) + raw_cases(rng)
    assert len(cases) >= 150
    images = os.path.realpath(csv_root / "images")

    def run(case):
        data, want = case
        (csv_root / "captions.csv").write_bytes(data)
        kind, value, caught = outcome(lambda: read_captions(str(csv_root)))
        if kind == "ok":  # every name the reader lets through is a file inside images/
            for name, caption in value:
                path = os.path.realpath(os.path.join(images, name))
                assert path.startswith(images + os.sep) and os.path.isfile(path), name
                assert caption and caption == norm(caption), caption
        if want is not None and kind != "known":
            assert kind == want[0], f"expected {want[:2]!r:.200}, got {kind} {value!r:.200}"
            if kind == "error":
                assert want[1] in value, f"expected '{want[1]}' in {value!r}"
            else:
                assert value == want[1]
                dropped = [w for w in caught if "empty caption" in w]
                assert dropped == ([f"{csv_root}/captions.csv: dropped {want[2]} row(s) with an empty caption"]
                                   if want[2] else []), caught
        return kind

    tally = check_all(cases, run)
    assert tally.get("ok", 0) >= 10 and tally.get("error", 0) >= 60, tally  # both sides really exercised


def test_nul_byte_in_a_file_name_is_a_data_error(tmp_path):
    write_csv(tmp_path, [("a\0.jpg", "a caption")])
    with pytest.raises(DataError, match="line 2"):
        read_captions(str(tmp_path))


def test_newline_in_a_csv_header_stays_one_line(tmp_path):
    os.makedirs(tmp_path / "images")
    (tmp_path / "captions.csv").write_bytes(b'"file\nname",caption\na.jpg,x\n')
    with pytest.raises(DataError) as e:
        read_captions(str(tmp_path))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------- (b) unbalanced quotes
def unbalanced_quote_cases(rng, count):
    """(description, (csv text, rows, opened line or None)): valid rows, one of which gets a stray double quote at
    the start of its caption (it opens a quoted field: every later row would vanish into it) or inside it (csv
    keeps it as a character: nothing is lost)."""
    words = ["red", "blue", "circle", "square", "left", "top", "big", "small"]
    cases = []
    for i in range(count):
        rows = [(rng.choice(["a.jpg", "b.png", "sub/c.jpg"]), " ".join(rng.sample(words, rng.randint(1, 4))))
                for _ in range(rng.randint(2, 6))]
        k, at_start = rng.randrange(len(rows)), rng.random() < 0.7
        lines = [f"{n},{c}" for n, c in rows]
        name, caption = rows[k]
        lines[k] = f'{name},"{caption}' if at_start else f'{name},{caption[:1]}"{caption[1:]}'
        text = "filename,caption\n" + "\n".join(lines) + "\n"
        cases.append((f"#{i} {text[:100]!r}", (text, rows, k + 2 if at_start else None)))
    return cases


def test_an_unbalanced_quote_never_swallows_rows_silently(csv_root):
    def run(case):
        text, rows, opened = case
        (csv_root / "captions.csv").write_text(text)
        kind, value, _ = outcome(lambda: read_captions(str(csv_root)))
        if opened is not None:
            assert kind == "error" and f"line {opened} opens a quote" in value, (kind, value)
        else:  # a quote inside a field is a character: every row is still there
            assert kind == "ok" and len(value) == len(set(rows)), (kind, value)
        return kind

    tally = check_all(unbalanced_quote_cases(random.Random(SEED), 40), run)
    assert tally.get("ok", 0) >= 5 and tally.get("error", 0) >= 20, tally


@pytest.mark.parametrize("text, message", [
    ('filename,caption\na.jpg,"open\nb.jpg,x\na.jpg,y\nb.jpg,z\n', "line 2 opens a quote that runs to line 5 and "
     "swallows 3 line(s) that look like rows (first: 'b.jpg,x')"),
    ('filename,caption\na.jpg,x\nb.jpg,"open\nhello\n', "line 3 opens a quote that is never closed"),
])
def test_the_issue_cases_name_the_line_where_the_quote_opened(tmp_path, text, message):
    os.makedirs(tmp_path / "images")
    (tmp_path / "captions.csv").write_text(text)
    with pytest.raises(DataError) as e:
        read_captions(str(tmp_path))
    assert message in str(e.value)


def test_a_quoted_caption_with_a_line_break_is_still_read(tmp_path):
    write_csv(tmp_path, [("a.jpg", "two\nlines"), ("b.jpg", "one line")])
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / name)
    assert read_captions(str(tmp_path)) == [("a.jpg", "two lines"), ("b.jpg", "one line")]
