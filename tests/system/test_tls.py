"""Agents over TLS (wss://): the fleet's traffic and token are encrypted and the coordinator
is authenticated by its certificate."""

from __future__ import annotations

import functools
import ssl
from pathlib import Path

import pytest
import trio
import trustme

from agent import CoordinatorUnreachable, open_agent
from agent.threaded import ThreadedAgent
from coordinator import open_coordinator, serve_coordinator
from statemachine import Migration, MigrationStatus, agent_credential
from tests.support.cli import run_lockstep
from tests.support.flow import columns, make_users


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_a_migration_over_wss(
    dsn: str, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    make_users(dsn)
    async with open_coordinator(dsn, ssl_context=server_context, token="s3cret") as coord:
        assert coord.url.startswith("wss://127.0.0.1:")
        async with open_agent(
            coord.url,
            agent_id="app-1",
            token=agent_credential("s3cret", "app-1"),
            ssl_context=client_context,
        ) as agent:
            result = await coord.run_migration(
                Migration("add_email", "ALTER TABLE users ADD COLUMN email TEXT")
            )
            assert result.status is MigrationStatus.COMPLETED, result.reason
            assert agent.is_applied("add_email")
    assert "email" in columns(dsn)


async def test_an_agent_that_does_not_trust_the_certificate_cannot_join(
    dsn: str, server_context: ssl.SSLContext
) -> None:
    async with open_coordinator(dsn, ssl_context=server_context) as coord:
        with pytest.raises(CoordinatorUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            async with open_agent(
                coord.url,
                agent_id="app-1",
                ssl_context=ssl.create_default_context(),
                wait_connected=True,
            ):
                pass
        assert coord.agents == frozenset()


async def test_threaded_agent_and_serve_coordinator_over_wss(
    dsn: str, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with trio.open_nursery() as nursery:
        coord = await nursery.start(
            functools.partial(serve_coordinator, dsn, ssl_context=server_context)
        )
        app = ThreadedAgent(coord.url, agent_id="django-1", ssl_context=client_context)
        await trio.to_thread.run_sync(app.start)
        try:
            await coord.wait_for_agents(1, timeout=10)
        finally:
            await trio.to_thread.run_sync(app.stop)
        nursery.cancel_scope.cancel()


def test_apply_serves_wss_with_a_certificate_and_key(
    dsn: str, ca: trustme.CA, tmp_path: Path
) -> None:
    make_users(dsn)
    cert = ca.issue_cert("127.0.0.1")
    cert_pem, key_pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    migration = tmp_path / "add_nick.sql"
    migration.write_text("ALTER TABLE users ADD COLUMN nick TEXT;\n")
    args = ["apply", str(migration), "--allow-no-agents", "--dsn", dsn, "--port", "0"]
    proc = run_lockstep(*args, "--tls-cert", str(cert_pem), "--tls-key", str(key_pem))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "coordinator listening on wss://127.0.0.1:" in proc.stdout
    assert "nick" in columns(dsn)

    half = run_lockstep(*args, "--tls-cert", str(cert_pem))
    assert half.returncode == 1
    assert "--tls-cert and --tls-key go together" in half.stderr
    wrong = run_lockstep(*args, "--tls-cert", str(key_pem), "--tls-key", str(key_pem))
    assert wrong.returncode == 1
    assert "cannot load the TLS certificate" in wrong.stderr
