"""The demo lineage against a real PostgreSQL server, with the production instance file.

A throw-away PostgreSQL cluster (Debian's `postgresql` package; `make test` installs it
when missing and run as root) listens on 127.0.0.1 on a free port, with password
authentication over TCP. DAGSTER_HOME holds resources/deploy/dagster_postgres.yaml
unchanged, pointed at the server through the DAGSTER_PG_* variables; the whole tiny
lineage runs in-process as `xcam materialize` runs it, and the runs, events, check
results and provenance tags are then read back from the server itself with psycopg2.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from cohorts import arrived_demo_cohort

from xcam_assets.config import load_settings
from xcam_assets.definitions import ASSETS, CHECKS
from xcam_assets.orchestrate import materialize_all, project_instance
from xcam_assets.project import batch_partitions
from xcam_assets.train.assets import arch_partitions

REPO = Path(__file__).resolve().parents[1]
PRODUCTION_YAML = REPO / "resources" / "deploy" / "dagster_postgres.yaml"
PG_USER, PG_PASSWORD, PG_DB = "xcam", "test-only-password", "dagster"

pytestmark = pytest.mark.slow


def _pg_bin() -> Path | None:
    """The directory of initdb/pg_ctl: Debian's /usr/lib/postgresql/<major>/bin (newest),
    else wherever PATH has them."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path and shutil.which("initdb") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    host: str
    port: int
    user: str
    password: str
    db: str

    def connect(self, db: str | None = None):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user,
                                password=self.password, dbname=db or self.db,
                                connect_timeout=10)


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server of its own: cluster in a temp dir, 127.0.0.1 and a free port,
    unix socket in the temp dir, stopped and deleted afterwards. initdb refuses to run as
    root, so as root the server runs as the `postgres` system user."""
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.skip("PostgreSQL server binaries absent (no /usr/lib/postgresql/*/bin/pg_ctl, "
                    "no pg_ctl on PATH): apt-get install postgresql; `make test` installs "
                    "it when run as root")
    pytest.importorskip("psycopg2", reason="psycopg2 comes with dagster-postgres: "
                        "re-run `make setup`")
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` system user to run "
                        "initdb/postgres as (Debian's postgresql package creates it)")
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root and `runuser` (util-linux) is absent: cannot drop "
                        "to the `postgres` user that initdb requires")
        as_user = [runuser, "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="xcam-pg-"))
    data, sock, log = base / "data", base / "sock", base / "server.log"
    sock.mkdir()
    pwfile = base / "pwfile"
    pwfile.write_text(PG_PASSWORD + "\n")
    if as_user:
        for path in (base, sock, pwfile):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    port = _free_port()
    server = PgServer("127.0.0.1", port, PG_USER, PG_PASSWORD, PG_DB)

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, text=True,
                       timeout=120)

    try:
        run(str(pg_bin / "initdb"), "-D", str(data), "-U", PG_USER, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
            "--no-locale", "--no-sync")
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off "
                   "-c full_page_writes=off -c synchronous_commit=off -c max_connections=50")
        run(str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
            "-w", "-t", "60", "start")
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = server.connect("postgres")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {PG_DB} OWNER {PG_USER}")
        conn.close()
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(base, ignore_errors=True)
        raise AssertionError(f"PostgreSQL did not start: {exc.cmd}\n{exc.stdout}\n"
                             f"{exc.stderr}") from exc
    try:
        yield server
    finally:
        subprocess.run([*as_user, str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast",
                        "-w", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def test_production_instance_file_keeps_the_projects_settings() -> None:
    import yaml

    prod = yaml.safe_load(PRODUCTION_YAML.read_text())
    local = yaml.safe_load((REPO / "dagster_home" / "dagster.yaml").read_text())
    for key in ("telemetry", "concurrency", "run_launcher"):
        assert prod[key] == local[key], key
    db = prod["storage"]["postgres"]["postgres_db"]
    # every connection setting from the environment, nothing secret in the file
    assert db.pop("scheme") == "postgresql+psycopg2"  # SQLAlchemy 2.1's default is psycopg 3
    assert {k: v["env"] for k, v in db.items()} == {
        "hostname": "DAGSTER_PG_HOST", "port": "DAGSTER_PG_PORT",
        "username": "DAGSTER_PG_USER", "password": "DAGSTER_PG_PASSWORD",
        "db_name": "DAGSTER_PG_DB"}


def test_demo_lineage_runs_green_against_postgres(project: Path, pg_server: PgServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    home = project / "dagster_home"
    shutil.copy(PRODUCTION_YAML, home / "dagster.yaml")
    for name, value in {"HOST": pg_server.host, "PORT": str(pg_server.port),
                        "USER": pg_server.user, "PASSWORD": pg_server.password,
                        "DB": pg_server.db}.items():
        monkeypatch.setenv(f"DAGSTER_PG_{name}", value)

    s = load_settings()
    arrived_demo_cohort(s, s.profile["demo_images"])
    logs: list[str] = []
    with project_instance(s) as instance:
        # the production file, as Dagster reads it from DAGSTER_HOME
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert type(instance.run_launcher).__name__ == "ProvenanceRunLauncher"
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert not instance.telemetry_enabled

        materialize_all(settings=s, instance=instance, log=logs.append)

        # every asset (every partition) materialized, every blocking check passed
        batches = sorted(instance.get_dynamic_partitions("batches"))
        assert len(batches) == 2
        n_materializations = 0
        for asset in ASSETS:
            partitions = {None: [None], batch_partitions: batches,
                          arch_partitions: s.architectures}[asset.partitions_def]
            for partition in partitions:
                record = instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=asset.key,
                                          asset_partitions=[partition] if partition else None),
                    limit=1).records
                assert record, (asset.key, partition)
                n_materializations += 1
        n_checks = 0
        for check_def in CHECKS:
            for spec in check_def.check_specs:
                history = instance.event_log_storage.get_asset_check_execution_history(
                    spec.key, limit=50)
                assert history and all(r.status.value == "SUCCEEDED" for r in history), spec.key
                n_checks += len(history)
        runs = instance.get_runs()
        assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        run_ids = {r.run_id for r in runs}

    # ... and it is all in PostgreSQL, not in a SQLite file beside dagster.yaml
    assert not list(home.rglob("*.db")), list(home.rglob("*.db"))
    with pg_server.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT run_id, status FROM runs")
        rows = dict(cur.fetchall())
        assert set(rows) == run_ids and set(rows.values()) == {"SUCCESS"}
        cur.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = "
                    "'ASSET_MATERIALIZATION'")
        assert cur.fetchone()[0] == n_materializations
        cur.execute("SELECT count(*) FROM asset_check_executions "
                    "WHERE execution_status = 'SUCCEEDED'")
        assert cur.fetchone()[0] == n_checks
        cur.execute("SELECT asset_key FROM asset_keys")
        stored = {dg.AssetKey.from_db_string(k).to_user_string() for (k,) in cur.fetchall()}
        assert stored >= {a.key.to_user_string() for a in ASSETS}
        cur.execute("SELECT partition FROM dynamic_partitions WHERE partitions_def_name = "
                    "'batches'")
        assert sorted(p for (p,) in cur.fetchall()) == batches
        # the `ingest` pool (raw_dicoms) got the instance's default limit of 1, shared by
        # every host using this database, and its slot was given back after the runs
        cur.execute("SELECT concurrency_key, \"limit\" FROM concurrency_limits")
        limits = dict(cur.fetchall())
        assert limits["ingest"] == 1 and set(limits.values()) == {1}
        cur.execute("SELECT count(*) FROM concurrency_slots WHERE concurrency_key = 'ingest' "
                    "AND run_id IS NOT NULL")
        assert cur.fetchone()[0] == 0
        # provenance: every run is tagged with where and by whom it ran, in Postgres too
        cur.execute("SELECT run_id, value FROM run_tags WHERE key = 'xcam/host'")
        assert {run_id for run_id, _ in cur.fetchall()} == run_ids
    conn.close()
    # one "materialized ... (run <id>)" line per run (other lines say why a batch runs)
    done = [line for line in logs if line.startswith("materialized ")]
    assert len(done) == len(run_ids)
    assert {line.rsplit("(run ", 1)[1].rstrip(")") for line in done} == {r[:8] for r in run_ids}
