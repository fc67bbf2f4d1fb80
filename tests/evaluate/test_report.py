"""The standalone HTML report (xcam_assets.evaluate.report): the builder on a hand-made
table (scorecard values, data-URI images, checks, provenance), the downscaling of wide
montages, and the file in headless Chromium: it renders, no image is broken, and no
request leaves file:// (tests/test_ui_browser.py's browser and skip rules)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import cv2
import numpy as np
import polars as pl
from automation.harness import chromium_page

from xcam_assets.evaluate.plots import plot_heatmap_montage, plot_metric_bars, plot_roc
from xcam_assets.evaluate.report import build_report_html, downscale_png
from xcam_assets.evaluate.scorecard import scorecard, scorecard_notes
from xcam_assets.evaluate.tables import MACRO, to_frame


def _png(w: int, h: int) -> bytes:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (40, 160, 220)
    return cv2.imencode(".png", img)[1].tobytes()


def _long() -> pl.DataFrame:
    def r(method, finding, metric, value, lo=None, hi=None, n=10):
        return {"architecture": "resnet18", "cam_method": method, "finding": finding,
                "metric": metric, "value": value, "ci_low": lo, "ci_high": hi, "n": n}
    return to_frame([
        r(None, "lesion", "auc", 0.8123, 0.7001, 0.9002, 40),
        r("gradcam", MACRO, "point_localization_accuracy", 0.4567, 0.3, 0.6, 18),
        r("gradcam", "lesion", "pointing_game", 0.5, 0.3, 0.7, 18),
        r("pylon", MACRO, "point_localization_accuracy", 0.2, 0.1, 0.3, 18),
    ])


def _report(plots: dict[str, bytes], montages: dict[str, bytes]) -> str:
    long = _long()
    return build_report_html(
        title="xcam study report: test", card=scorecard(long, "lesion"),
        notes=scorecard_notes(long, "lesion"), plots=plots, montages=montages,
        extra_montages={"resnet18/montage_gradcam": _png(30, 20)},
        provenance={"git_commit": "abc1234", "profile": "tiny", "study": "demo",
                    "code_version": "metric_tables 3", "parameters": {"n_boot": 50}},
        checks=[{"asset": "cohort_splits", "check": "splits_ok", "partition": "",
                 "passed": True, "blocking": True, "description": "fine"},
                {"asset": "findings", "check": "labels_match_images", "partition": "b1",
                 "passed": False, "blocking": True, "description": "ghost.dcm"}],
        external=scorecard(long.with_columns(pl.lit("external").alias("split")), "lesion",
                           split="external", drop_empty_columns=True),
        data_versions=[{"asset": "heatmap_sets", "partition": "resnet18",
                        "data_version": "d41d8cd9.dir", "code_version": "2", "time": ""}])


def test_builder_shows_the_scorecard_and_inlines_every_image() -> None:
    html = _report({"roc_lesion": _png(40, 30)}, {"montage_resnet18": _png(50, 20)})
    assert "0.812 [0.700, 0.900] n=40" in html  # the model's AUC cell
    assert "0.457 [0.300, 0.600] n=18" in html  # PLA, macro row
    assert html.index("gradcam") < html.index("pylon")  # sorted by PLA, descending
    srcs = re.findall(r"<img src='([^']*)'", html)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1])[:4] == b"\x89PNG"
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert "abc1234" in html and "metric_tables 3" in html and "d41d8cd9.dir" in html
    # the verdict names the failed blocking check before the scorecard
    assert html.index("FAILED: findings/labels_match_images") < html.index("Scorecard")
    assert "External validation" in html


def test_wide_montages_are_downscaled() -> None:
    small = _png(300, 100)
    assert downscale_png(small, 1000) == small
    out = cv2.imdecode(np.frombuffer(downscale_png(_png(2400, 600), 1000), np.uint8),
                       cv2.IMREAD_UNCHANGED)
    assert out.shape[:2] == (250, 1000)


def _real_plots() -> tuple[dict[str, bytes], dict[str, bytes]]:
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(15), np.zeros(15)]
    s = y * 0.6 + rng.random(30) * 0.7
    images = [rng.integers(0, 255, (32, 32), dtype=np.uint8) for _ in range(2)]
    maps = {"gradcam": rng.random((2, 32, 32)).astype(np.float32)}
    return ({"roc_lesion": plot_roc({"resnet18": (y, s)}, "ROC", n_boot=20),
             "metrics_lesion": plot_metric_bars(_long(), "lesion", ["pointing_game"])},
            {"montage_resnet18": plot_heatmap_montage(images, maps, ["a", "b"], "montage",
                                                      boxes=[[[4, 4, 12, 12]], []])})


def test_report_opens_offline_in_chromium(tmp_path: Path) -> None:
    plots, montages = _real_plots()
    path = tmp_path / "report.html"
    path.write_text(_report(plots, montages))
    requests: list[str] = []
    with chromium_page(width=1300, height=900) as page:
        page.on("request", lambda req: requests.append(req.url))
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate("""() => Array.from(document.images).map(
            i => ({complete: i.complete, w: i.naturalWidth, alt: i.alt}))""")
        assert len(images) == 4, images  # 2 plots, 1 montage, 1 per-method montage
        assert all(i["complete"] and i["w"] > 0 for i in images), images
        auc = page.get_by_text("0.812 [0.700, 0.900] n=40")
        assert auc.count() >= 2 and auc.first.is_visible()  # on both method rows
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    leaving = [u for u in requests if not u.startswith(("file://", "data:"))]
    assert not leaving, leaving
    assert requests and requests[0].startswith("file://")
    print(f"screenshot: {tmp_path / 'report.png'}")


def test_report_images_of_a_project(project: Path) -> None:
    from xcam_assets.config import load_settings
    from xcam_assets.evaluate.report import report_images

    s = load_settings()
    arch = s.architectures[0]
    plots_dir = s.metrics_dir / "plots"
    plots_dir.mkdir(parents=True)
    for name in ("metrics_lesion", "roc_lesion", "calibration_lesion", f"montage_{arch}"):
        (plots_dir / f"{name}.png").write_bytes(_png(40, 30))
    (s.heatmaps_dir / arch).mkdir(parents=True)
    (s.heatmaps_dir / arch / "montage_gradcam.png").write_bytes(_png(2000, 100))
    plots, montages, extra = report_images(s)
    assert list(plots) == ["roc_lesion", "metrics_lesion", "calibration_lesion"]
    assert list(montages) == [f"montage_{arch}"]
    wide = cv2.imdecode(np.frombuffer(extra[f"{arch}/montage_gradcam"], np.uint8),
                        cv2.IMREAD_UNCHANGED)
    assert wide.shape[1] == 1000  # downscaled


def test_montages_are_capped_in_area_and_stored_as_jpeg() -> None:
    """A tall montage (the NIH study's are 1000 x 6000+) is scaled to the pixel cap and
    re-encoded as JPEG: the report stays a few MB."""
    from xcam_assets.evaluate.report import data_uri

    rng = np.random.default_rng(0)
    tall = rng.integers(0, 255, (6000, 1000, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", tall)
    out = downscale_png(buf.tobytes(), 1000, max_pixels=1_500_000, jpeg_quality=80)
    img = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED)
    assert out[:2] == b"\xff\xd8" and img.shape[0] * img.shape[1] <= 1_500_000
    assert abs(img.shape[0] / img.shape[1] - 6.0) < 0.02  # aspect kept
    assert data_uri(out).startswith("data:image/jpeg;base64,")
    assert data_uri(buf.tobytes()).startswith("data:image/png;base64,")
