"""The Dagster UI in a real browser: dagster-webserver and dagster-daemon on 127.0.0.1
against an instance that holds a full tiny run; headless Debian Chromium (Playwright)
opens the asset graph, finds every asset and every check, launches a materialization
with the UI's Materialize button, and the daemon runs it to success. Screenshots are
saved in the test's tmp dir (paths printed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from automation.harness import (
    CHROMIUM,
    chromium_page,
    copy_project,
    dagster_services,
    full_tiny_run,
    graphql,
    wait_for,
)

from xcam_assets.definitions import ASSETS, CHECKS

pytestmark = pytest.mark.slow
RUNS = """query { runsOrError(limit: 20) { ... on Runs { results {
  runId status tags { key value } } } } }"""


@pytest.fixture
def full_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             tmp_path: Path) -> Path:
    if not CHROMIUM.exists():
        pytest.skip(f"no browser: {CHROMIUM} is absent (apt-get install chromium; "
                    "`make test` installs it when run as root)")
    return copy_project(full_tiny_run(request, tmp_path_factory), tmp_path / "project")


def test_ui_shows_every_asset_and_check_and_launches_a_run(full_run: Path,
                                                           tmp_path: Path) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    assets = [a.key.to_user_string() for a in ASSETS]
    checks = {spec.asset_key.to_user_string(): spec.name
              for c in CHECKS for spec in c.check_specs}
    flock = full_run / ".xcam" / "dvc.flock"
    flock_before = flock.stat().st_mtime if flock.exists() else 0.0
    with dagster_services(full_run, tmp_path / "logs", webserver=True,
                          XCAM_SENSOR_INTERVAL_S="3") as services, \
            chromium_page() as page:
        url = str(services["url"])
        logs = services["logs"]
        before = {r["runId"] for r in graphql(url, RUNS)["runsOrError"]["results"]}

        # the global asset graph, groups expanded: every asset is a node
        page.goto(f"{url}/asset-groups")
        page.get_by_text("Global asset lineage").first.wait_for(timeout=60_000)
        page.get_by_text("preprocess").last.wait_for(timeout=60_000)  # the graph's groups
        _dismiss_community_dialog(page)
        _expand_all_groups(page)
        for asset in assets:
            page.get_by_text(asset, exact=True).last.wait_for(timeout=30_000)
        page.wait_for_timeout(2000)  # let the nodes' materialization status load
        page.screenshot(path=str(shots / "asset-graph.png"))

        # each asset's checks tab names its blocking check and its latest result
        for asset in assets:
            page.goto(f"{url}/assets/{asset}?view=checks")
            page.get_by_text(checks[asset], exact=True).first.wait_for(timeout=30_000)
            page.get_by_text("This is a blocking asset check.").first.wait_for(timeout=30_000)
        page.screenshot(path=str(shots / "checks-metric_tables.png"))

        # launch a materialization from the asset page's Materialize button
        page.goto(f"{url}/assets/cohort_splits")
        page.locator("button", has_text="Materialize").first.click(timeout=60_000)
        page.get_by_text("Launched run").first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "launched.png"))

        def new_run() -> dict | None:
            runs = graphql(url, RUNS)["runsOrError"]["results"]
            fresh = [r for r in runs if r["runId"] not in before
                     and {"key": "dagster/from_ui", "value": "true"} in r["tags"]]
            return fresh[0] if fresh and fresh[0]["status"] in (
                "SUCCESS", "FAILURE", "CANCELED") else None

        run = wait_for("the UI-launched run to finish", new_run, 240, interval=2, logs=logs)
        assert run["status"] == "SUCCESS", run
        tags = {t["key"]: t["value"] for t in run["tags"]}
        assert tags.get("xcam/host") and tags.get("xcam/git_commit")  # the launcher's tags
        page.goto(f"{url}/runs/{run['runId']}")
        page.get_by_text("Success").first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "run-success.png"))
        # the dvc_commit_after_run sensor commits the run's DVC stage (under the DVC lock)
        wait_for("dvc commit after the UI run", lambda: flock.exists()
                 and flock.stat().st_mtime > flock_before, 120, logs=logs)
    for shot in sorted(shots.iterdir()):
        print(f"screenshot: {shot}")


def _dismiss_community_dialog(page: object) -> None:
    """The UI's first visit asks to join its community: skip it when it shows."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(timeout=5_000)
        skip.click()
    except Exception:  # noqa: BLE001 - playwright's TimeoutError: no dialog this time
        pass


def _expand_all_groups(page: object) -> None:
    """The graph's context menu: *Expand all groups* (groups start collapsed)."""
    size = page.viewport_size
    for _ in range(3):
        page.mouse.click(size["width"] - 320, size["height"] - 120, button="right")
        item = page.get_by_role("menuitem", name="Expand all groups")
        try:
            item.wait_for(timeout=5_000)
            item.click()
            return
        except Exception:  # noqa: BLE001 - menu not open yet (page still settling)
            page.keyboard.press("Escape")
            _dismiss_community_dialog(page)
    raise AssertionError("the asset graph's context menu did not offer 'Expand all groups'")
