"""Reader of a captions table in no published format (a contest's spreadsheet, an export): CSV, TSV or JSON lines,
one image-caption pair a row, the columns named by --image-column and --caption-column.

CSV and TSV need a header row. A JSON-lines row is an object; its caption may also be a list of captions. Image
names are kept exactly as written (they name files in --images); tools.prepare_data renames those that would not
read back from captions.csv. This is not dataset.read_captions_csv, which reads the project's own captions.csv
and normalises the file names it returns: here a name must find its source file as spelled.

A row that cannot be read is an error naming its line, never a row left out: a quote that opens and never
closes, or that runs over lines holding what look like further rows, is reported at the line where it opened.
"""
import csv
import json
from pathlib import Path

from tools.caption_sources import Item, fail, shown

FORMATS = {"csv": ",", "tsv": "\t", "jsonl": None}
SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def table_format(path, given):
    if given:
        return given
    if Path(path).suffix.lower() not in SUFFIXES:
        fail(f"cannot tell the format of {path} from its name; pass --format csv, tsv or jsonl")
    return SUFFIXES[Path(path).suffix.lower()]


def delimited_rows(path, f, delimiter, columns):
    """(line, image, caption) of a CSV or TSV file with a header naming `columns`."""
    reader = csv.reader(f, delimiter=delimiter, strict=True)
    header, start = None, 1
    try:
        for record in reader:  # reader.line_num is where the record ends; `start` where it began
            if header is None and record:
                missing = [c for c in columns if record.count(c) != 1]
                if missing:
                    fail(f"{path} needs a header row with the column {shown(missing[0])} once; its header is "
                         f"{shown(delimiter.join(record))} (pass --image-column and --caption-column)")
                header, width = [record.index(c) for c in columns], len(record)
            elif record:
                if len(record) != width:
                    fail(f"{path} line {start} has {len(record)} fields, the header {width}; quote fields that "
                         f"contain the delimiter")
                spans = reader.line_num - start
                if spans and any("\n" in v and delimiter in v.split("\n", 1)[1] for v in record):
                    fail(f"{path} line {start}: a quoted field opened here runs over {spans + 1} lines that look "
                         "like rows of their own; close the quote")
                yield start, record[header[0]], record[header[1]]
            start = reader.line_num + 1
    except csv.Error as e:
        fail(f"{path} line {start} is not valid {'CSV' if delimiter == ',' else 'TSV'} ({e}); a quote opened "
             "there may never close")


def jsonl_rows(path, f, columns):
    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            fail(f"{path} line {number} is not a JSON object; fix or remove it")
        if not isinstance(record, dict) or any(c not in record for c in columns):
            fail(f"{path} line {number} has no {shown(columns[0])} and {shown(columns[1])} (pass --image-column "
                 "and --caption-column)")
        captions = record[columns[1]]
        for caption in captions if isinstance(captions, list) else [captions]:
            yield number, record[columns[0]], caption


def read_table(path, images_dir, image_column, caption_column, given_format=None):
    kind = table_format(path, given_format)
    columns = (image_column, caption_column)
    captions = {}  # image name -> captions, in file order
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = jsonl_rows(path, f, columns) if kind == "jsonl" else delimited_rows(path, f, FORMATS[kind],
                                                                                      columns)
            for line, name, caption in rows:
                if not isinstance(name, str) or not name:
                    fail(f"{path} line {line}: the image name {shown(name)} is not a file name")
                if not isinstance(caption, str):
                    fail(f"{path} line {line}: the caption {shown(caption)} is not text")
                captions.setdefault(name, []).append(caption)
    except FileNotFoundError:
        fail(f"{path} not found")
    except IsADirectoryError:
        fail(f"{path} is a folder; pass the captions table")
    except UnicodeDecodeError:
        fail(f"{path} is not a UTF-8 text file; save it as UTF-8")
    if not captions:
        fail(f"{path} has no rows")
    return [Item(name, images_dir / name, caps) for name, caps in captions.items()]
