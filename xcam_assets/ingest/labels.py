"""The canonical batch label file (`labels.csv`): strict reader and atomic writer.

Every arrival batch carries one `labels.csv` with the columns, in this order,
`file,finding,present,x_min,y_min,x_max,y_max,mask_file`: one row per (image,
finding, box). Labels are the ground truth of every metric downstream, so the
reader refuses anything ambiguous instead of guessing, and reports **every**
problem of the file at once (one line per problem, each naming the file and the
1-based data row; the header is row 0), so a person fixes the file in one pass.

Conventions the reader enforces (and callers may rely on):

* `present` is exactly `0` or `1`; surrounding whitespace of any field is ignored.
* a box is all four of `x_min,y_min,x_max,y_max` or none of them; finite,
  non-negative pixels of the stored DICOM image, `x_min < x_max`,
  `y_min < y_max`, `x_max`/`y_max` exclusive. Whether a box lies inside its
  image is not known here (the `findings` asset check does that).
* a `present=0` row has neither box nor mask; a (file, finding) pair is never
  both present and absent; one (file, finding) has at most one mask file.
* `file` and `mask_file` are relative POSIX paths inside the batch folder (no
  `..`, no leading `/`, no drive, no backslash, no control character such as NUL).
  Mask files are not opened here; nothing is ever written under a name taken from
  a label file.

Two ways to read, one rule set:

* `read_batch_labels` / `parse_labels_text` are **strict**: any problem raises
  `LabelError` listing every problem (writers, importers and tools use this: a
  label table is fixed before anything is written).
* `screen_batch_labels` is what ingest (the `findings` asset) uses: a bad **row**
  does not fail the whole file. It is set aside with its row number and reason,
  the good rows pass, and the `findings` asset records the bad rows in
  `data/findings/<batch>.parquet` with `status="rejected_label"`; the blocking
  check `labels_match_images` then fails naming each one (`<file>: row <n>:
  <reason>`), so nothing downstream trains on the batch until the file is fixed,
  while every problem is visible at once in the UI. Only what makes the whole file
  unreadable (missing or wrong header, CSV syntax the reader cannot resync after)
  still raises `LabelError` and fails the asset.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import polars as pl

from xcam_assets.atomic import atomic_write_text

LABEL_COLUMNS: tuple[str, ...] = (
    "file", "finding", "present", "x_min", "y_min", "x_max", "y_max", "mask_file",
)
"""Columns of the canonical labels.csv, in file order."""

BOX_FIELDS: tuple[str, ...] = ("x_min", "y_min", "x_max", "y_max")

BOX_DTYPE = pl.Struct({k: pl.Float64 for k in BOX_FIELDS})

LABELS_SCHEMA: dict[str, pl.DataType] = {
    "file": pl.String(), "finding": pl.String(), "present": pl.Boolean(),
    "boxes": pl.List(BOX_DTYPE), "mask_file": pl.String(),
}
"""Schema of `read_batch_labels`: one row per (file, finding)."""

_MAX_LISTED = 50  # problems spelled out in one LabelError message


class LabelError(ValueError):
    """A labels file that cannot be trusted; str() has one line per problem.

    Each line reads `<labels file>: row <n>: <problem>` (`header` instead of a
    row for column problems). `errors` keeps the (row, problem) pairs (row 0 =
    header) for programs; args are plain data so the error pickles across
    Dagster's process boundary."""

    def __init__(self, path: str | Path, errors: list[tuple[int, str]]) -> None:
        super().__init__(str(path), list(errors))
        self.path = str(path)
        self.errors = list(errors)

    def __str__(self) -> str:
        lines = [f"{self.path}: {'header' if row == 0 else f'row {row}'}: {problem}"
                 for row, problem in self.errors[:_MAX_LISTED]]
        if len(self.errors) > _MAX_LISTED:
            lines.append(f"{self.path}: ... and {len(self.errors) - _MAX_LISTED} more problem(s)")
        return "\n".join(lines)


REJECTED_SCHEMA: dict[str, pl.DataType] = {
    "label_row": pl.Int64(), "file": pl.String(), "finding": pl.String(), "reason": pl.String(),
}
"""Schema of the rows `screen_batch_labels` sets aside: row number (header = 0), the
row's file and finding as written (printable), and every problem of the row."""


def _show(value: str, limit: int = 60) -> str:
    """A value quoted in a message: repr, cut to `limit` characters (a hostile 100 kB
    cell must not become a 100 kB log line)."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def path_problem(value: str, column: str) -> str | None:
    """Why `value` is not a safe relative path inside the batch folder (None if it is)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return f"{column} {_show(value)} contains a control character (e.g. NUL)"
    if "\\" in value:
        return f"{column} {_show(value)} contains a backslash (use '/')"
    if value.startswith("/") or (len(value) > 1 and value[1] == ":"):
        return f"{column} {_show(value)} is an absolute path (must be relative to the batch folder)"
    if ".." in PurePosixPath(value).parts:
        return f"{column} {_show(value)} contains '..' (must stay inside the batch folder)"
    return None


def _parse_coord(text: str, column: str) -> tuple[float | None, str | None]:
    try:
        value = float(text)
    except ValueError:
        return None, f"{column} {_show(text)} is not a number"
    if not math.isfinite(value):
        return None, f"{column} {_show(text)} is not finite"
    if value < 0:
        return None, f"{column} {_show(text)} is negative"
    return value, None


def _check_row(fields: dict[str, str]) -> tuple[dict[str, Any] | None, list[str]]:
    """Validate one data row on its own; returns the parsed row or its problems."""
    problems: list[str] = []
    file, finding = fields["file"], fields["finding"]
    if not file:
        problems.append("file is empty")
    elif (p := path_problem(file, "file")) is not None:
        problems.append(p)
    if not finding:
        problems.append("finding is empty")
    present_text = fields["present"]
    if present_text not in ("0", "1"):
        problems.append(f"present must be 0 or 1, got {_show(present_text)}")
    given = [k for k in BOX_FIELDS if fields[k]]
    box: dict[str, float] | None = None
    if given and len(given) < len(BOX_FIELDS):
        missing = [k for k in BOX_FIELDS if not fields[k]]
        problems.append(f"box is incomplete: {', '.join(missing)} empty "
                        "(give all four coordinates or none)")
    elif given:
        coords: dict[str, float] = {}
        for k in BOX_FIELDS:
            value, problem = _parse_coord(fields[k], k)
            if value is None:
                problems.append(problem or f"{k} is not a number")
            else:
                coords[k] = value
        if len(coords) == len(BOX_FIELDS):
            if coords["x_min"] >= coords["x_max"]:
                problems.append(f"x_min {coords['x_min']:g} is not < x_max {coords['x_max']:g}")
            if coords["y_min"] >= coords["y_max"]:
                problems.append(f"y_min {coords['y_min']:g} is not < y_max {coords['y_max']:g}")
            box = coords
    mask = fields["mask_file"] or None
    if mask is not None and (p := path_problem(mask, "mask_file")) is not None:
        problems.append(p)
    if present_text == "0" and (given or mask):
        problems.append("a present=0 row must have no box and no mask_file")
    if problems:
        return None, problems
    return {"file": file, "finding": finding, "present": present_text == "1",
            "box": box, "mask_file": mask}, []


def _printable(value: str) -> str:
    """`value` as valid UTF-8 text (bytes that were not UTF-8 shown as U+FFFD)."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _check_header(reader: Any, source: str | Path) -> None:
    header = next(reader, None)
    if header is None:
        raise LabelError(source, [(0, "file is empty (expected a header: "
                                      f"{','.join(LABEL_COLUMNS)})")])
    header = [_printable(h.strip()) for h in header]
    if tuple(header) != LABEL_COLUMNS:
        missing = [c for c in LABEL_COLUMNS if c not in header]
        extra = [c for c in header if c not in LABEL_COLUMNS]
        detail = []
        if missing:
            detail.append(f"missing {missing}")
        if extra:
            detail.append(f"unexpected {extra}")
        if not detail:
            detail.append(f"columns out of order or repeated: {header}")
        raise LabelError(source, [(0, f"columns must be exactly {','.join(LABEL_COLUMNS)}; "
                                      + "; ".join(detail))])


def _parse(text: str, source: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(groups, rejected rows): every good row grouped by (file, finding), every bad
    row with all its problems. Raises LabelError only for whole-file problems."""
    reader = csv.reader(io.StringIO(text, newline=""))
    _check_header(reader, source)
    rejected: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], dict[str, Any]] = {}

    def reject(row_no: int, raw: list[str], problems: list[str]) -> None:
        rejected.append({"label_row": row_no,
                         "file": _printable(raw[0].strip()) if raw else "",
                         "finding": _printable(raw[1].strip()) if len(raw) > 1 else "",
                         "problems": problems})

    row_no = 0
    try:
        for row_no, raw in enumerate(reader, start=1):
            if not raw or (len(raw) == 1 and not raw[0].strip()):
                continue  # blank line
            if len(raw) != len(LABEL_COLUMNS):
                reject(row_no, raw, [f"has {len(raw)} fields, expected {len(LABEL_COLUMNS)}"])
                continue
            if any("\udc80" <= c <= "\udcff" for v in raw for c in v):
                reject(row_no, raw, ["is not UTF-8 text"])
                continue
            parsed, problems = _check_row({c: v.strip() for c, v in zip(LABEL_COLUMNS, raw,
                                                                        strict=True)})
            if parsed is None:
                reject(row_no, raw, problems)
                continue
            key = (parsed["file"], parsed["finding"])
            group = groups.get(key)
            if group is None:
                group = groups[key] = {"file": key[0], "finding": key[1],
                                       "present": parsed["present"], "boxes": [],
                                       "mask_file": parsed["mask_file"], "label_rows": [],
                                       "box_rows": []}
            else:
                first = group["label_rows"][0]
                if group["present"] != parsed["present"]:
                    reject(row_no, raw, [f"{key[0]} {key[1]!r} is present=1 and present=0 "
                                         f"(also row {first})"])
                    continue
                if parsed["mask_file"]:
                    if group["mask_file"] and group["mask_file"] != parsed["mask_file"]:
                        reject(row_no, raw, [f"{key[0]} {key[1]!r} has two mask files: "
                                             f"{group['mask_file']!r} and "
                                             f"{parsed['mask_file']!r}"])
                        continue
                    group["mask_file"] = parsed["mask_file"]
            group["label_rows"].append(row_no)
            if parsed["box"] is not None:
                group["boxes"].append(parsed["box"])
                group["box_rows"].append(row_no)
    except csv.Error as exc:  # e.g. a field over the csv module's size limit
        raise LabelError(source, [(row_no + 1, f"unreadable CSV: {exc}")]) from None
    return list(groups.values()), rejected


def _decode(data: bytes) -> str:
    # utf-8-sig: a byte-order mark (spreadsheet exports) must not rename the first column;
    # surrogateescape: a row with bytes that are not UTF-8 is rejected, not the file
    return data.decode("utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8",
                       "surrogateescape")


def parse_labels_text(text: str, source: str | Path) -> pl.DataFrame:
    """Parse canonical labels CSV text strictly; `source` names it in error messages.

    Split from `read_batch_labels` so writers can validate before anything
    reaches disk."""
    groups, rejected = _parse(text, source)
    if rejected:
        raise LabelError(source, [(r["label_row"], p) for r in rejected for p in r["problems"]])
    return pl.DataFrame(
        [{k: g[k] for k in LABELS_SCHEMA} for g in groups],
        schema=LABELS_SCHEMA,
    ) if groups else pl.DataFrame(schema=LABELS_SCHEMA)


def read_batch_labels(labels_csv: Path) -> pl.DataFrame:
    """One row per (file, finding) with its boxes, in order of first appearance.

    Columns: file, finding, present (bool), boxes (list of {x_min, y_min, x_max,
    y_max} Float64, empty when none), mask_file (null when none). Raises
    LabelError listing every problem of the file (see the module docstring)."""
    labels_csv = Path(labels_csv)
    return parse_labels_text(_decode(labels_csv.read_bytes()), labels_csv)


SCREENED_SCHEMA: dict[str, pl.DataType] = {
    **LABELS_SCHEMA, "label_rows": pl.List(pl.Int64()), "box_rows": pl.List(pl.Int64()),
}
"""Schema of `screen_batch_labels`'s good rows: `LABELS_SCHEMA` plus the data row
numbers of each (file, finding) and the row of each box (aligned with `boxes`)."""


def screen_batch_labels(labels_csv: Path, name: str | None = None
                        ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(good rows, rejected rows) of a batch's labels.csv: the ingest reader.

    Good rows are grouped as in `read_batch_labels`, with `label_rows`/`box_rows`
    (`SCREENED_SCHEMA`); each bad row is one `REJECTED_SCHEMA` row whose `reason` reads
    `<name>: row <n>: <problem>[; <problem>...]` (`name` defaults to the path; the
    asset passes `<batch>/labels.csv` so its output does not depend on where the
    project lives). A later row that contradicts
    an earlier one (present and absent, two masks) is the rejected one. Raises
    LabelError only when the file as a whole cannot be read (see the module docstring)."""
    labels_csv = Path(labels_csv)
    name = name or str(labels_csv)
    groups, rejected = _parse(_decode(labels_csv.read_bytes()), name)
    good = pl.DataFrame([{k: g[k] for k in SCREENED_SCHEMA} for g in groups],
                        schema=SCREENED_SCHEMA) if groups else pl.DataFrame(
                            schema=SCREENED_SCHEMA)
    bad = pl.DataFrame(
        [{"label_row": r["label_row"], "file": r["file"], "finding": r["finding"],
          "reason": f"{name}: row {r['label_row']}: " + "; ".join(r["problems"])}
         for r in rejected], schema=REJECTED_SCHEMA)
    return good, bad


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def _flat_rows(rows: Iterable[Mapping[str, Any]] | pl.DataFrame) -> Iterable[dict[str, Any]]:
    """Canonical rows from flat rows or from grouped rows that carry a `boxes` list."""
    source = rows.iter_rows(named=True) if isinstance(rows, pl.DataFrame) else rows
    for row in source:
        if "boxes" in row:
            base = {k: row.get(k) for k in ("file", "finding", "present", "mask_file")}
            boxes = row["boxes"] or []
            if not boxes:
                yield base
            for box in boxes:
                yield {**base, **{k: box[k] for k in BOX_FIELDS}}
        else:
            yield {k: row.get(k) for k in LABEL_COLUMNS}


def format_batch_labels(rows: Iterable[Mapping[str, Any]] | pl.DataFrame) -> str:
    """The canonical CSV text for `rows` (see `write_batch_labels`)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(LABEL_COLUMNS)
    for row in _flat_rows(rows):
        writer.writerow([_fmt(row.get(c)) for c in LABEL_COLUMNS])
    return buf.getvalue()


def write_batch_labels(rows: Iterable[Mapping[str, Any]] | pl.DataFrame, path: Path) -> Path:
    """Write a canonical labels.csv atomically; refuse rows the reader would reject.

    `rows` are mappings with the canonical columns (missing keys = empty; bools
    and ints for `present`) or the grouped rows of `read_batch_labels` (a
    `boxes` list is expanded to one row per box), so read -> write round-trips.
    The text is validated first (LabelError names `path`), then written to a
    temporary file beside `path` and renamed over it: a reader never sees half
    a file."""
    path = Path(path)
    text = format_batch_labels(rows)
    parse_labels_text(text, path)
    atomic_write_text(path, text)
    return path
