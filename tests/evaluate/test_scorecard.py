"""The scorecard (xcam_assets.evaluate.scorecard): exact cells from a hand-made long table,
the sort order, missing metrics, no empty rows, the aligned text and the UI's table
metadata."""

from __future__ import annotations

import dagster as dg
import polars as pl

from xcam_assets.evaluate.assets import scorecard_table_metadata
from xcam_assets.evaluate.scorecard import (
    MISSING,
    scorecard,
    scorecard_notes,
    scorecard_text,
    shorten,
)
from xcam_assets.evaluate.tables import MACRO, to_frame


def _r(arch, method, finding, metric, value, lo=None, hi=None, n=10, split="test"):
    return {"architecture": arch, "cam_method": method, "finding": finding, "metric": metric,
            "value": value, "ci_low": lo, "ci_high": hi, "n": n, "split": split}


def long_table() -> pl.DataFrame:
    rows = [
        # model A: AUC of the primary finding and of another one, macro AUC
        _r("archA", None, "Abnormal", "auc", 0.8214, 0.7531, 0.8792, 282),
        _r("archA", None, "Mass", "auc", 0.61, 0.5, 0.7, 282),
        _r("archA", None, MACRO, "auc", 0.7, 0.6, 0.8, 282),
        _r("archA", None, "Abnormal", "threshold", 0.4, n=300),
        # two CAM methods of A; PLA by finding and macro; the primary finding has no boxes
        _r("archA", "gradcam", "Mass", "point_localization_accuracy", 0.5, 0.3, 0.7, 12),
        _r("archA", "gradcam", MACRO, "point_localization_accuracy", 0.25, 0.14, 0.3, 104),
        _r("archA", "gradcam", "Mass", "pointing_game", 0.4, 0.2, 0.6, 12),
        _r("archA", "gradcam", "Nodule", "pointing_game", 0.2, 0.1, 0.3, 14),
        _r("archA", "gradcam", "Abnormal", "aopc", 0.05, -0.01, 0.1, 8),
        _r("archA", "pylon", MACRO, "point_localization_accuracy", 0.12, 0.07, 0.18, 104),
        _r("archA", "pylon", "Mass", "blank_map_rate", 0.0, 0.0, 0.0, 12),
        # model B: single method, better localization, no AUC row at all
        _r("archB", "gradcam", MACRO, "point_localization_accuracy", 0.6, 0.5, 0.7, 104),
        _r("archB", "gradcam", "Abnormal", "pointing_game", 0.9, n=5),
        # a method row with nothing of the headline: dropped (A's AUC would fill it, so
        # this architecture has no diagnostic rows)
        _r("archC", "eigencam", "Mass", "ehr_auc", 0.5, 0.4, 0.6, 12),
        # a pseudo-method row of A without headline metrics: dropped, though A has an AUC
        _r("archA", "gradcam~eigencam", "Mass", "method_agreement_spearman", 0.3, n=12),
        # model D: diagnostic rows only (no heatmaps)
        _r("archD", None, "Abnormal", "auc", 0.7, 0.6, 0.8, 282),
        # external rows never enter the test scorecard
        _r("archA", None, "Abnormal", "auc", 0.99, 0.9, 1.0, 50, split="external"),
    ]
    return to_frame(rows)


def test_cells_sorting_missing_and_no_empty_rows() -> None:
    card = scorecard(long_table(), primary="Abnormal")
    assert card.columns == ["architecture", "cam_method", "auc", "point_localization_accuracy",
                            "pointing_game", "energy_pointing_game", "aopc", "blank_map_rate"]
    # sorted by PLA descending, missing last; archC's all-missing row is gone
    assert card.select("architecture", "cam_method").rows() == [
        ("archB", "gradcam"), ("archA", "gradcam"), ("archA", "pylon"), ("archD", "-")]
    rows = {(r["architecture"], r["cam_method"]): r for r in card.iter_rows(named=True)}
    a = rows[("archA", "gradcam")]
    assert a["auc"] == "0.821 [0.753, 0.879] n=282"  # the primary finding, not the macro
    assert a["point_localization_accuracy"] == "0.250 [0.140, 0.300] n=104"  # macro row
    assert a["pointing_game"] == "0.300 (mean of 2 findings)"  # no Abnormal / macro row
    assert a["aopc"] == "0.050 [-0.010, 0.100] n=8"
    assert a["energy_pointing_game"] == MISSING and a["blank_map_rate"] == MISSING
    p = rows[("archA", "pylon")]
    assert p["auc"] == a["auc"]  # the model's AUC repeats on every method row
    assert p["blank_map_rate"] == "0.000 [0.000, 0.000] n=12"  # the only finding with it
    b = rows[("archB", "gradcam")]
    assert b["auc"] == MISSING and b["pointing_game"] == "0.900 n=5"  # no CI: no brackets
    d = rows[("archD", "-")]
    assert d["auc"] == "0.700 [0.600, 0.800] n=282"
    assert [d[c] for c in card.columns[3:]] == [MISSING] * 5
    for r in card.iter_rows():
        assert any(c != MISSING for c in r[2:])


def test_primary_defaults_and_tie_break_and_external() -> None:
    long = long_table()
    # without a primary finding: the first finding by name ("Abnormal")
    assert scorecard(long).equals(scorecard(long, primary="Abnormal"))
    # equal PLA: pointing game decides, then names
    tie = to_frame([
        _r("x", "m1", MACRO, "point_localization_accuracy", 0.5, 0.4, 0.6),
        _r("x", "m2", MACRO, "point_localization_accuracy", 0.5, 0.4, 0.6),
        _r("x", "m2", "f", "pointing_game", 0.9),
        _r("x", "m1", "f", "pointing_game", 0.1),
        _r("x", "m0", MACRO, "point_localization_accuracy", 0.5, 0.4, 0.6),
    ])
    assert scorecard(tie)["cam_method"].to_list() == ["m2", "m1", "m0"]
    ext = scorecard(long, primary="Abnormal", split="external", drop_empty_columns=True)
    assert ext.rows() == [("archA", "-", "0.990 [0.900, 1.000] n=50")]
    assert ext.columns == ["architecture", "cam_method", "auc"]


def test_optional_headline_columns_appear_only_when_present() -> None:
    long = long_table()
    assert "sanity_pass" not in scorecard(long).columns
    flagged = pl.concat([long, to_frame([_r("archA", "gradcam", "Abnormal", "sanity_pass",
                                            1.0, n=4)])])
    card = scorecard(flagged)
    assert card.columns[-1] == "sanity_pass"
    rows = {(r["architecture"], r["cam_method"]): r for r in card.iter_rows(named=True)}
    assert rows[("archA", "gradcam")]["sanity_pass"] == "1.000 n=4"
    assert rows[("archA", "pylon")]["sanity_pass"] == MISSING


def test_text_table_is_aligned_and_fits() -> None:
    long = long_table().with_columns(pl.col("architecture").replace(
        "archA", "baseline_efficientnet_lite0_with_a_very_long_name"))
    text = scorecard_text(long, primary="Abnormal", width=100)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert "0.82 [0.75,0.88]" in text and "n=282" in text
    assert "baseline_effnet_lite0_with_a_very_long_name" not in text  # shortened
    assert "…" in text
    headers = [line for line in lines if line.startswith("architecture")]
    assert len(headers) >= 2  # the columns continue in a second block
    # every value line of a block starts its columns where the header does
    block = lines[:lines.index("")]
    starts = [block[0].index(label) for label in ("AUC", "PLA")]
    for line in block[2::2]:
        for s in starts:
            assert line[s - 2:s] == "  "
    assert shorten("gradcam", 16) == "gradcam"
    assert len(shorten("a" * 40, 16)) == 16
    assert any("PLA" in n for n in scorecard_notes(long, "Abnormal"))


def test_table_metadata_is_a_dagster_table_with_its_schema() -> None:
    card = scorecard(long_table(), primary="Abnormal")
    meta = scorecard_table_metadata(card)
    assert isinstance(meta, dg.TableMetadataValue)
    assert [c.name for c in meta.schema.columns] == card.columns
    assert all(c.type == "string" for c in meta.schema.columns)
    assert len(meta.records) == card.height
    assert meta.records[0].data["architecture"] == "archB"
    assert meta.records[0].data["point_localization_accuracy"] == "0.600 [0.500, 0.700] n=104"


def test_the_audit_records_the_table_metadata_as_json() -> None:
    import json

    from xcam_assets.provenance.audit import metadata_json

    card = scorecard(long_table(), primary="Abnormal")
    out = json.loads(json.dumps(metadata_json({"scorecard": scorecard_table_metadata(card)})))
    assert out["scorecard"]["columns"] == card.columns
    assert out["scorecard"]["records"][0]["architecture"] == "archB"
