from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.runtime import Runtime
from bot.wiring import build_runtime
from database import Database, PostgresDatabase, SqliteDatabase
from tests.fake_whatsapp import FakeWhatsApp
from tests.pg_cluster import PostgresCluster
from tests.runtime_helpers import FAST, make_config

# Any real neonize client started by a test (or its children) dials a closed loopback port.
os.environ["HTTPS_PROXY"] = "http://127.0.0.1:9"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster().start()
    load = None
    if os.environ.get("ZAPKEEP_TEST_PG_LOAD") == "1":  # scripts/stress-tests.sh --pg-load
        import subprocess
        import sys

        load = subprocess.Popen([sys.executable, "-m", "tests.pg_load", cluster.create_database()])
    try:
        yield cluster
    finally:
        if load is not None:
            load.kill()
            load.wait()
        cluster.stop()


@pytest.fixture
def database_url(pg_cluster: PostgresCluster) -> str:
    return pg_cluster.create_database()


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """The same tests run against both back-ends."""
    if request.param == "postgresql":
        database: Database = PostgresDatabase(request.getfixturevalue("database_url"))
    else:
        database = SqliteDatabase(tmp_path / "zapkeep.sqlite3")
    database.open()
    try:
        yield database
    finally:
        database.close()


@pytest.fixture(scope="session")
def whatsmeow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpaired store whose schema the real neonize library created."""
    from tests.synthetic import neonize

    path = tmp_path_factory.mktemp("whatsmeow-template") / "whatsmeow.sqlite3"
    neonize("create", path)
    return path


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # This process opens store files with sqlite3; neonize's own SQLite must never join it.
    import sys

    assert "neonize" not in sys.modules, "the test process imported neonize; run it in a child process"


@pytest.fixture
def processes() -> Iterator[list]:
    """Child processes a test starts; any still running at the end (a failed test) are killed."""
    started: list = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def network(whatsmeow_template: Path) -> FakeWhatsApp:
    return FakeWhatsApp(schema_template=whatsmeow_template)


@pytest.fixture
def runtime_factory(db: Database, network: FakeWhatsApp, tmp_path: Path) -> Iterator:
    made: list[Runtime] = []

    def make(**kwargs) -> Runtime:
        config = kwargs.pop("config", None) or make_config(tmp_path)
        runtime = build_runtime(config, db, network.factory, timing=kwargs.pop("timing", FAST), **kwargs)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.stop()
