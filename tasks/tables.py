"""Reading the comma-separated tables the file-based tasks load (``.csv`` or ``.csv.gz``).

:func:`read_table` reads one or more files with the same columns into a :class:`Table` of string
columns that remembers, for every row, its file and line, so that every error can name the file,
the column, the line and what was expected. Conversions (:meth:`Table.numeric`,
:meth:`Table.timestamps`) parse on demand. Missing-value tokens: empty, ``NA``, ``NaN``, ``NULL``,
``N/A``, ``None`` (any case).

The older line-based helpers (:func:`read_text`, :func:`split_header`, :func:`read_numeric_columns`)
serve the traffic and weather readers.
"""

from __future__ import annotations

import csv
import glob
import io
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from tasks.datasets import DataError
from tasks.options import shown_path

__all__ = ["TableError", "Table", "read_table", "resolve_files", "read_text", "split_header",
           "read_numeric_columns", "refuse_unstandardisable", "MISSING_TOKENS"]

MISSING_TOKENS = frozenset({"", "na", "nan", "null", "n/a", "none"})


class TableError(DataError):
    """A data file is missing or malformed; the message names the file (and, where it applies,
    the column, the line and what was expected)."""


def refuse_unstandardisable(what: str, names: Sequence[str], raw: np.ndarray, *standardised: np.ndarray) -> None:
    """Refuse data too large to standardise. ``raw [R, K]`` holds columns ``names`` as read (NaN =
    missing); ``standardised`` are what training sees of them — z-scores ``[R, K]`` and
    statistics ``[.., K]`` — checked as float32. A non-finite value there (from a 1e308 sentinel
    or a unit error: the mean or std overflows, or a z-score exceeds float32) would make the
    client's loss and metrics NaN, so it is a :class:`TableError`: ``what`` (e.g. "input
    column(s)"), then the columns."""
    k = len(names)
    bad = np.zeros(k, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore"):
        for a in standardised:
            bad |= ~np.isfinite(np.asarray(a).astype(np.float32).reshape(-1, k)).all(0)
        if not bad.any():
            return
        values = np.abs(np.asarray(raw, dtype=np.float64)[:, bad])
        largest = float(np.max(values[np.isfinite(values)], initial=0.0))
    cols = [names[i] for i in np.flatnonzero(bad)]
    raise TableError(f"{what} {cols} cannot be standardised: values up to {largest:.3g} make the "
                     "standardised data non-finite; expected values of a physical size (a sentinel such as 1e308, "
                     "or a unit error?)")


# -- whole-file helpers (traffic, weather) ------------------------------------------------------

_LOADTXT_MISSING = ("NA", '"NA"', "", '""', "NaN", "nan", "NULL", "null", "N/A")


def read_numeric_columns(path: Path, text: str, header: Sequence[str], columns: Sequence[int]) -> np.ndarray:
    """Parse the data lines ``text`` (no header) of a comma-separated file into ``[rows, len(columns)]``
    float64; missing tokens (NA, empty, NaN …) → NaN. Errors name ``path``."""
    body = "\n" + text.replace("\r\n", "\n")
    if not body.endswith("\n"):
        body += "\n"
    for tok in _LOADTXT_MISSING:  # str.replace is ~10x faster than a regex here
        for _ in range(2):  # twice: adjacent tokens share a comma
            body = body.replace("," + tok + ",", ",nan,")
        body = body.replace("," + tok + "\n", ",nan\n").replace("\n" + tok + ",", "\nnan,")
    body = body.strip("\n")
    if not body:
        return np.zeros((0, len(columns)))
    try:
        return np.loadtxt(io.StringIO(body), delimiter=",", usecols=list(columns), quotechar='"',
                          dtype=np.float64, ndmin=2, comments=None)
    except ValueError as exc:
        names = [header[c] for c in columns]
        raise TableError(
            f"{path}: expected numeric values in columns {names} on every row with {len(header)} "
            f"comma-separated fields: {exc}"
        ) from None


def read_text(path: Path) -> str:
    """Whole text of a ``.csv`` or ``.csv.gz`` file; a clear error when missing or unreadable."""
    import gzip

    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: file not found")
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8-sig", newline="") as fh:
                return fh.read()
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise TableError(f"{path}: cannot read as UTF-8 text ({exc})") from None


def split_header(path: Path, text: str) -> tuple[list[str], str]:
    """``(header cells, remaining text)`` of a CSV; error when empty."""
    head, _, body = text.partition("\n")
    head = head.strip("\r")
    if not head.strip():
        raise TableError(f"{path}: empty file, expected a header row")
    cells = [c.strip() for c in next(csv.reader([head]))]
    return cells, body


# -- tables of string columns -------------------------------------------------------------------

def resolve_files(files: Sequence[str], data_dir: str | None, option: str = "files") -> list[Path]:
    """The files named by ``files`` (relative to ``data_dir`` when given; glob patterns expand, in
    sorted order). Errors name the option and the pattern that matched nothing."""
    if not files:
        raise ValueError(f"task option {option} is not set; give a CSV file (or a list of them)")
    base = Path(data_dir).expanduser() if data_dir else None
    if base is not None and not base.is_dir():
        raise TableError(f"{shown_path(base)}: data_dir is not a directory")
    out: list[Path] = []
    for item in files:
        p = Path(item).expanduser()
        p = p if p.is_absolute() or base is None else base / p
        if any(ch in str(p) for ch in "*?["):
            found = sorted(Path(m) for m in glob.glob(str(p)))
            if not found:
                raise TableError(f"{p}: task option {option}: no file matches this pattern")
            out.extend(found)
        elif not p.is_file():
            raise TableError(f"{shown_path(p)}: file not found (task option {option})")
        else:
            out.append(p)
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Table:
    """Rows of one or more CSV files with the same columns.

    Attributes:
        header: column names (the first file's order).
        columns: name → ``[R]`` array of strings, as in the file (not stripped).
        file_index: ``[R]`` which of ``paths`` each row came from.
        line: ``[R]`` the row's line number in its file (the header is line 1).
        paths: the files read.
    """

    header: tuple[str, ...]
    columns: dict[str, np.ndarray]
    file_index: np.ndarray
    line: np.ndarray
    paths: tuple[Path, ...]

    @property
    def num_rows(self) -> int:
        return int(self.line.size)

    @property
    def source(self) -> str:
        """The file(s), for messages about the whole table."""
        return str(self.paths[0]) if len(self.paths) == 1 else f"{self.paths[0]} (and {len(self.paths) - 1} more files)"

    def file_of(self, row: int) -> Path:
        return self.paths[int(self.file_index[row])]

    def at(self, row: int) -> str:
        """``"<file> line <n>"`` of one row."""
        return f"{self.file_of(row)} line {int(self.line[row])}"

    def has(self, name: str) -> bool:
        return name in self.columns

    def require(self, name: str, option: str) -> np.ndarray:
        """The raw column ``name``; a one-line error naming the option when there is none."""
        if name not in self.columns:
            raise TableError(
                f"{self.source}: no column {name!r} (task option {option}); the columns are {', '.join(self.header)}"
            )
        return self.columns[name]

    def strings(self, name: str, option: str) -> np.ndarray:
        """Column ``name`` with surrounding whitespace and quotes removed."""
        return np.char.strip(np.char.strip(self.require(name, option)), '"')

    def missing(self, name: str, option: str) -> np.ndarray:
        """``[R]`` bool: the cell holds a missing-value token."""
        return np.isin(np.char.lower(self.strings(name, option)), list(MISSING_TOKENS))

    def numeric(self, name: str, option: str, expected: str = "numbers") -> np.ndarray:
        """Column ``name`` as float64, missing tokens → NaN; a value that is not a number is an
        error naming the file, line, column and ``expected``."""
        values = self.strings(name, option)
        missing = np.isin(np.char.lower(values), list(MISSING_TOKENS))
        out = np.full(values.size, np.nan)
        try:
            out[~missing] = values[~missing].astype(np.float64)
        except ValueError:
            for row in np.flatnonzero(~missing):
                try:
                    float(values[row])
                except ValueError:
                    raise TableError(
                        f"{self.at(row)}: column {name!r} (task option {option}) has {str(values[row])!r}; "
                        f"expected {expected}"
                    ) from None
        return out

    def is_numeric(self, name: str) -> bool:
        """Every non-missing value of ``name`` parses as a number."""
        try:
            self.numeric(name, "")
        except TableError:
            return False
        return True

    def timestamps(self, name: str, option: str, fmt: str | None = None) -> np.ndarray:
        """Column ``name`` as ``datetime64[s]``: ISO 8601 (``2024-01-31``, ``2024-01-31 13:50``,
        ``…T13:50:00``, ``2024/01/31 …``; an offset or ``Z`` is converted to UTC), ``fmt`` a
        ``strptime`` format, or ``fmt = "unix"`` (seconds since 1970). Errors name the line."""
        values = self.strings(name, option)
        uniq, inverse = np.unique(values, return_inverse=True)
        parsed = np.empty(uniq.size, dtype="datetime64[s]")
        for i, text in enumerate(uniq):
            moment = _parse_time(str(text), fmt)
            if moment is None:
                row = int(np.flatnonzero(inverse == i)[0])
                hint = f"the format {fmt!r}" if fmt else "ISO 8601 such as 2024-01-31 or 2024-01-31 13:50:00 (or set timestamp_format)"
                raise TableError(
                    f"{self.at(row)}: column {name!r} (task option {option}) has {str(text)!r}, which is not a "
                    f"date-time; expected {hint}"
                )
            parsed[i] = moment
        return parsed[inverse]

    def take(self, rows: np.ndarray) -> "Table":
        return Table(self.header, {k: v[rows] for k, v in self.columns.items()}, self.file_index[rows],
                     self.line[rows], self.paths)


def _parse_time(text: str, fmt: str | None) -> np.datetime64 | None:
    try:
        if fmt == "unix":
            return np.datetime64(int(float(text)), "s")
        if fmt:
            moment = datetime.strptime(text, fmt)
        else:
            t = text.replace("/", "-") if len(text) >= 10 and text[4:5] == "/" and text[7:8] == "/" else text
            moment = datetime.fromisoformat(t)
    except (ValueError, OverflowError):
        return None
    if moment.tzinfo is not None:  # a fixed offset or Z: one UTC axis (no DST gaps or repeats)
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return np.datetime64(moment.replace(microsecond=0), "s")


def _records(reader, text: str, path: Path, width: int) -> tuple[list[list[str]], list[int]]:
    """The data records after the header and their line numbers; blank lines skipped, a record
    of another width is an error naming its line."""
    try:
        records = list(reader)  # at C speed; line numbers recovered below
    except csv.Error as exc:
        raise TableError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from None
    newlines = text.count("\n") + (0 if text.endswith("\n") else 1)
    if newlines == len(records) + 1:  # no quoted line breaks: record i is on line i + 2
        numbers = range(2, len(records) + 2)
    else:  # quoted line breaks: read again, tracking the reader's line numbers
        again = csv.reader(io.StringIO(text))
        next(again)
        numbers = []
        for _ in again:
            numbers.append(again.line_num)
    if all(len(r) == width for r in records):  # the usual case: nothing to skip or report
        return records, list(numbers)
    rows, nums = [], []
    for row, line in zip(records, numbers):
        if len(row) != width:
            if not row or not any(c.strip() for c in row):
                continue
            raise TableError(f"{path} line {line}: {len(row)} fields, expected {width} (the header's columns)")
        rows.append(row)
        nums.append(line)
    return rows, nums


def read_table(paths: Sequence[Path]) -> Table:
    """Read CSV files that share their columns (in any order) into one :class:`Table`."""
    header: list[str] | None = None
    parts: dict[str, list] = {}
    file_index, lines = [], []
    for k, path in enumerate(paths):
        text = read_text(path)
        reader = csv.reader(io.StringIO(text))
        head = next(reader, None)
        if head is None or not any(c.strip() for c in head):
            raise TableError(f"{path}: empty file, expected a header row of column names")
        head = [c.strip() for c in head]
        dup = sorted({c for c in head if head.count(c) > 1})
        if dup:
            raise TableError(f"{path}: duplicate column names {dup} in the header")
        if header is None:
            header = head
            parts = {c: [] for c in header}
        elif set(head) != set(header):
            missing, extra = sorted(set(header) - set(head)), sorted(set(head) - set(header))
            raise TableError(
                f"{path}: expected the same columns as {paths[0]}; missing {missing}, extra {extra}"
            )
        rows, nums = _records(reader, text, path, len(head))
        cols = list(zip(*rows)) if rows else [()] * len(head)
        for name, col in zip(head, cols):
            parts[name].append(np.array(col, dtype=str))
        file_index.append(np.full(len(rows), k, dtype=np.int64))
        lines.append(np.array(nums, dtype=np.int64))
    if header is None:
        raise TableError("no files to read")
    columns = {c: np.concatenate(v) if v else np.zeros(0, dtype=str) for c, v in parts.items()}
    table = Table(tuple(header), columns, np.concatenate(file_index), np.concatenate(lines), tuple(paths))
    if table.num_rows == 0:
        raise TableError(f"{table.source}: no data rows after the header")
    return table
