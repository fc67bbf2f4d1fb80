"""Security: the artifact scanner finds what it must, header values never become paths,
CLI names stay inside the drop zone, and the UI binds 127.0.0.1 unless told otherwise.

The full-run scan (every artifact under data/, the Dagster instance and the captured
logs, for PHI and the pseudonymisation key) is tests/test_phi.py (slow); the positive
controls here prove its scanner sees a planted key in every kind of file a run writes.
"""

from __future__ import annotations

import gzip
import io
import json
import sqlite3
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
from PIL import Image, PngImagePlugin
from test_phi import find_in_text, find_values, hostile_identifiers, tree

from xcam_assets.cli import build_parser, main, ui_command
from xcam_assets.config import load_settings
from xcam_assets.demo import write_demo_cohort
from xcam_assets.orchestrate import STAGES, _run, register_batches
from xcam_assets.project import XcamProject

KEY = "planted-key-7d3a9c"


def _plant(root: Path, value: str) -> dict[str, Path]:
    """`value` hidden in each kind of artifact the pipeline writes (encoded/compressed)."""
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    files["parquet"] = root / "table.parquet"
    pl.DataFrame({"x": ["a", f"m{value}", "z"] * 50}).write_parquet(
        files["parquet"], compression="zstd")
    files["npy"] = root / "names.npy"
    np.save(files["npy"], np.array(["a", value]))  # UTF-32 on disk
    for kind, zipped in (("png_ztxt", True), ("png_itxt", False)):
        info = PngImagePlugin.PngInfo()
        if zipped:
            info.add_text("comment", value, zip=True)
        else:
            info.add_itxt("comment", value, zip=True)
        files[kind] = root / f"{kind}.png"
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(files[kind], pnginfo=info)
    files["json"] = root / "sidecar.json"
    files["json"].write_text(json.dumps({"k": value}))
    files["gzip"] = root / "log.gz"
    files["gzip"].write_bytes(gzip.compress(value.encode() * 20))
    files["sqlite"] = root / "runs.db"
    con = sqlite3.connect(files["sqlite"])
    con.execute("create table t (v text)")
    con.execute("insert into t values (?)", (value,))
    con.commit()
    con.close()
    files["utf16"] = root / "note.txt"
    files["utf16"].write_bytes(value.encode("utf-16-le"))
    return files


def test_scanner_finds_a_planted_key_in_every_kind_of_file(tmp_path: Path) -> None:
    files = _plant(tmp_path / "planted", KEY)
    # the raw bytes alone would miss most of them (compressed or not UTF-8)
    missed_by_raw = [k for k, p in files.items() if KEY.encode() not in p.read_bytes()]
    assert {"npy", "png_ztxt", "png_itxt", "gzip", "utf16"} <= set(missed_by_raw)
    hits = find_values(tmp_path / "planted", {KEY})
    assert sorted(h.split(":")[0] for h in hits) == sorted(
        p.relative_to(tmp_path / "planted").as_posix() for p in files.values())
    assert find_in_text("log", f"... {KEY} ...", {KEY}) == [f"log: {KEY}"]
    # negative control: the same files without the key
    _plant(tmp_path / "clean", "nothing-to-see-here")
    assert find_values(tmp_path / "clean", {KEY}) == []


def test_ui_binds_loopback_by_default() -> None:
    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1" and args.port == 3000
    command = ui_command(args)
    assert command[1:] == ["dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", "3000"]
    assert Path(command[0]).name == "dagster" and Path(command[0]).exists()
    # another interface only when asked for explicitly
    other = ui_command(build_parser().parse_args(["ui", "--host", "0.0.0.0", "--port", "8080"]))
    assert other[-4:] == ["-h", "0.0.0.0", "-p", "8080"]


@pytest.mark.parametrize("name", ["../../escape", "/tmp/escape", "..", "a/b", "x\x00y",
                                  ".hidden", ""])
def test_cli_batch_names_stay_in_the_drop_zone(project: Path, tmp_path: Path,
                                               name: str) -> None:
    table = tmp_path / "labels-in.csv"
    table.write_text("file,finding,present,x_min,y_min,x_max,y_max,mask_file\n"
                     "a.dcm,lesion,0,,,,,\n")
    before = tree(tmp_path)
    with pytest.raises(SystemExit, match="is not a plain folder name"):
        main(["import-labels", "csv", str(table), "--batch", name])
    with pytest.raises(SystemExit, match="is not a plain folder name"):
        main(["import-tbx11k", str(tmp_path), "--batch", name])
    assert tree(tmp_path) == before


def test_hostile_header_identifiers_never_become_paths(project: Path) -> None:
    """Patient IDs / SOP Instance UIDs like `../../x`, `/tmp/x`, with NUL: admitted (they
    are only ever hashed), ingested and preprocessed; every file written lies under
    data/ or the Dagster home and no name carries them."""
    s = load_settings()
    batch = write_demo_cohort(s.incoming_dir, n_images=6, n_batches=1, size=64, seed=s.seed,
                              finding=s.findings[0])[0]
    hostile = hostile_identifiers(sorted(batch.glob("*.dcm")))
    (batch / ".complete").touch()
    before = tree(project.parent)
    instance = dg.DagsterInstance.get()
    register_batches(instance, [batch.name])
    _run(STAGES["ingest"] + STAGES["preprocess"], instance, XcamProject(), batch.name,
         log=print)
    inv = pl.read_parquet(s.inventory_dir / f"{batch.name}.parquet")
    assert inv.filter(pl.col("file").is_in(list(hostile)))["status"].to_list() == ["ok", "ok"]
    manifest = pl.read_parquet(s.tensors_dir / batch.name / "manifest.parquet")
    assert set(hostile) <= set(manifest["file"].to_list())
    new = tree(project.parent) - before
    assert new and all(n.startswith(("project/data/", "project/dagster_home/")) for n in new)
    assert not [n for n in tree(project.parent) if "xcam-evil" in n]
    assert not list(Path("/tmp").glob("xcam-evil*"))
    # and the identifiers themselves are nowhere outside the source copies
    text = io.StringIO()
    for table in (inv, manifest):
        table.select(pl.col(pl.String)).write_csv(text)
    assert not [v for v in hostile.values() if v in text.getvalue()]
    assert find_values(s.data_dir, set(hostile.values()), skip=("incoming", "raw")) == []


def test_symlinks_in_an_upload_are_not_followed(project: Path, tmp_path: Path) -> None:
    """A link in the drop zone to a file elsewhere (a key, another site's images) is not
    copied into data/raw (and so never reaches the DVC remote), nor inventoried."""
    s = load_settings()
    batch = write_demo_cohort(s.incoming_dir, n_images=4, n_batches=1, size=64, seed=s.seed,
                              finding=s.findings[0])[0]
    secret = tmp_path / "secret.key"
    secret.write_text("TOP-SECRET-0123456789")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "other_site.dcm").write_bytes(next(batch.glob("*.dcm")).read_bytes())
    (batch / "innocent.dcm").symlink_to(secret)
    (batch / "linked_dir").symlink_to(elsewhere, target_is_directory=True)
    (batch / ".complete").touch()
    instance = dg.DagsterInstance.get()
    register_batches(instance, [batch.name])
    result = _run(STAGES["ingest"], instance, XcamProject(), batch.name, log=print)
    raw = s.raw_dir / batch.name
    assert not (raw / "innocent.dcm").exists() and not (raw / "linked_dir").exists()
    assert not [p for p in raw.rglob("*") if p.is_symlink()]
    mat = next(e.event_specific_data.materialization for e in result.all_events
               if e.event_type_value == "ASSET_MATERIALIZATION"
               and e.asset_key == dg.AssetKey("raw_dicoms"))
    assert mat.metadata["symlinks_not_copied"].value == ["innocent.dcm"]
    inv = pl.read_parquet(s.inventory_dir / f"{batch.name}.parquet")
    assert "innocent.dcm" not in inv["file"].to_list() and inv.height == 4
    assert find_values(s.data_dir, {"TOP-SECRET-0123456789"}, skip=("incoming",)) == []
