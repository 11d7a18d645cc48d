"""TLS in process: HTTPS and WSS on one port, workers that verify the server's certificate
(against a CA file, never silently skipped), and clear errors for unusable TLS files.

Certificates come from ``trustme``: a throwaway CA and a server certificate for ``127.0.0.1``
and ``localhost``, trusted by nothing but the tests that are handed the CA file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import openai
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from structlog.testing import capture_logs

from llamapool.backends.demo import DemoBackend
from llamapool.config import ServeConfig, WorkConfig
from llamapool.errors import ConfigError
from llamapool.plugin_api import BackendSettings
from llamapool.run import running_server
from llamapool.worker.agent import Agent

from .cli_helpers import cli_env, cli_process, run_cli, ws_url
from .conftest import wait_for
from .redis_helpers import running_redis

API_KEY = "tls-api-key"
WORKER_KEY = "tls-worker-key"
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "over tls"}]}


@attrs.frozen
class Certs:
    """PEM files of a test CA and of a server certificate it signed."""

    ca: Path
    cert: Path
    key: Path
    other_key: Path  # the key of another certificate: does not match ``cert``
    encrypted_key: Path  # ``key``, encrypted with a passphrase


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, a server certificate for 127.0.0.1 and localhost, and an unrelated key."""
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    other = ca.issue_cert("other.invalid")
    paths = Certs(
        ca=directory / "ca.pem",
        cert=directory / "server.pem",
        key=directory / "server.key",
        other_key=directory / "other.key",
        encrypted_key=directory / "encrypted.key",
    )
    ca.cert_pem.write_to_path(str(paths.ca))
    server.cert_chain_pems[0].write_to_path(str(paths.cert))
    for blob in server.cert_chain_pems[1:]:
        blob.write_to_path(str(paths.cert), append=True)
    server.private_key_pem.write_to_path(str(paths.key))
    other.private_key_pem.write_to_path(str(paths.other_key))
    key = serialization.load_pem_private_key(server.private_key_pem.bytes(), password=None)
    paths.encrypted_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    return paths


def trusting(certs: Certs) -> ssl.SSLContext:
    """A client context that trusts the test CA (and nothing else)."""
    return ssl.create_default_context(cafile=str(certs.ca))


def wss(url: str) -> str:
    return "wss" + url.removeprefix("https") + "/workers/connect"


@contextlib.asynccontextmanager
async def tls_pool(certs: Certs, **overrides: Any) -> AsyncIterator[str]:
    """A server on a free loopback port serving HTTPS and WSS; yields its https:// URL."""
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "tls_cert": str(certs.cert),
        "tls_key": str(certs.key),
        "api_keys": API_KEY,
        "worker_keys": WORKER_KEY,
    }
    settings.update(overrides)
    async with running_server(ServeConfig(**settings)) as url:
        yield url


@contextlib.asynccontextmanager
async def demo_worker(server_url: str, **overrides: Any) -> AsyncIterator[Agent]:
    """A demo-backend worker dialing ``server_url``; cancelled when the block ends."""
    cfg = WorkConfig(server_url=server_url, worker_key=WORKER_KEY, **overrides)
    agent = Agent(cfg, DemoBackend(BackendSettings(url="")), backend_name="demo")
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def registered(agent: Agent) -> None:
    await asyncio.wait_for(agent.registered.wait(), timeout=10)


async def healthz(url: str, certs: Certs) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(url + "/healthz", ssl=trusting(certs)) as r,
    ):
        assert 200 == r.status
        body: dict[str, Any] = await r.json()
        return body


# --- the whole pool over TLS ----------------------------------------------------------------


async def test_the_pool_serves_https_and_wss_on_one_port(certs: Certs) -> None:
    """A worker joins over wss:// with the CA file and a client is served over https://."""
    async with tls_pool(certs) as url, demo_worker(wss(url), ca_file=str(certs.ca)) as agent:
        await registered(agent)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                url + "/v1/chat/completions",
                json=CHAT,
                headers={"Authorization": f"Bearer {API_KEY}"},
                ssl=trusting(certs),
            ) as resp,
        ):
            answer = await resp.json()
        health = await healthz(url, certs)

    assert url.startswith("https://127.0.0.1:")
    assert (200, "echo: over tls") == (resp.status, answer["choices"][0]["message"]["content"])
    assert 1 == health["workers"]


async def test_the_openai_sdk_is_served_over_https(certs: Certs) -> None:
    """The openai SDK, on its httpx client set to trust the CA, is served a chat, whole and
    streamed, through the pool."""
    messages: Any = CHAT["messages"]
    async with tls_pool(certs) as url, demo_worker(wss(url), ca_file=str(certs.ca)) as agent:
        await registered(agent)
        http = openai.DefaultAsyncHttpxClient(verify=trusting(certs))
        async with openai.AsyncOpenAI(
            base_url=url + "/v1", api_key=API_KEY, http_client=http, max_retries=0
        ) as client:
            whole = await client.chat.completions.create(model="demo", messages=messages)
            stream = await client.chat.completions.create(
                model="demo", messages=messages, stream=True
            )
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]

    assert "echo: over tls" == whole.choices[0].message.content
    assert "echo: over tls" == "".join(parts)


async def test_a_client_that_does_not_trust_the_ca_is_refused(certs: Certs) -> None:
    """A client checking against the system store rejects the test server's certificate."""
    async with tls_pool(certs) as url, aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with http.get(url + "/healthz"):
                pass


async def test_plain_http_to_the_tls_port_fails(certs: Certs) -> None:
    """The TLS port speaks no plain HTTP: a request in clear text gets no answer."""
    async with tls_pool(certs) as url, aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.get("http" + url.removeprefix("https") + "/healthz"):
                pass
        health = await healthz(url, certs)

    assert "ok" == health["status"]


# --- the worker checks the server -----------------------------------------------------------


async def test_a_worker_without_the_ca_keeps_retrying_and_never_registers(certs: Certs) -> None:
    """A worker verifying against the system store fails the handshake, says the certificate
    is why, and keeps retrying instead of joining or stopping."""
    with capture_logs() as logs:
        async with tls_pool(certs) as url, demo_worker(wss(url)) as agent:
            await wait_for(
                lambda: sum(e["event"] == "server_unreachable" for e in logs) >= 2,
                timeout=10,
                what="two failed connection attempts",
            )
            health = await healthz(url, certs)

    assert "certificate verify failed" in agent.last_error.lower()
    assert not agent.registered.is_set()
    assert 0 == health["workers"]


async def test_tls_insecure_connects_and_logs_a_warning(certs: Certs) -> None:
    """tls_insecure=True skips verification and says so with a tls_verification_disabled
    warning naming the server."""
    with capture_logs() as logs:
        async with tls_pool(certs) as url, demo_worker(wss(url), tls_insecure=True) as agent:
            await registered(agent)
            health = await healthz(url, certs)

    warnings = [e for e in logs if e["event"] == "tls_verification_disabled"]
    assert 1 == health["workers"]
    assert [("warning", wss(url))] == [(e["log_level"], e["url"]) for e in warnings]


async def test_a_verifying_worker_logs_no_tls_warning(certs: Certs) -> None:
    """A worker that verifies the server never logs tls_verification_disabled."""
    with capture_logs() as logs:
        async with tls_pool(certs) as url, demo_worker(wss(url), ca_file=str(certs.ca)) as agent:
            await registered(agent)

    assert [] == [e for e in logs if e["event"] == "tls_verification_disabled"]


# --- unusable TLS settings ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        ("missing_cert", "key", "TLS file not found: {missing_cert}"),
        ("cert", "missing_key", "TLS file not found: {missing_key}"),
        ("ca", "key", "cannot use TLS_CERT '{ca}' with TLS_KEY '{key}'"),  # not the key's cert
        ("cert", "other_key", "cannot use TLS_CERT '{cert}' with TLS_KEY '{other_key}'"),
        ("cert", "garbage", "cannot use TLS_CERT '{cert}' with TLS_KEY '{garbage}'"),
    ],
    ids=["missing-cert", "missing-key", "wrong-cert", "mismatched-key", "key-not-pem"],
)
async def test_unusable_tls_files_are_config_errors(
    certs: Certs, tmp_path: Path, cert: str, key: str, message: str
) -> None:
    """A missing file, a pair that does not match, or a file that is not PEM is a ConfigError
    naming the file, and leaves no server task behind."""
    (tmp_path / "garbage").write_text("not a pem file\n")
    files = {
        "cert": certs.cert,
        "key": certs.key,
        "ca": certs.ca,
        "other_key": certs.other_key,
        "garbage": tmp_path / "garbage",
        "missing_cert": tmp_path / "missing.pem",
        "missing_key": tmp_path / "missing.key",
    }
    expected = message.format_map({name: str(path) for name, path in files.items()})

    with pytest.raises(ConfigError) as raised:
        async with tls_pool(certs, tls_cert=str(files[cert]), tls_key=str(files[key])):
            pass

    assert str(raised.value).startswith(expected)
    assert {asyncio.current_task()} == asyncio.all_tasks()


def test_half_a_tls_setting_is_a_config_error() -> None:
    """A certificate without its key, or a key without its certificate, is refused."""
    with pytest.raises(ConfigError, match="TLS needs both TLS_CERT and TLS_KEY"):
        ServeConfig(tls_cert="server.pem")
    with pytest.raises(ConfigError, match="TLS needs both TLS_CERT and TLS_KEY"):
        ServeConfig(tls_key="server.key")


def test_a_missing_ca_file_is_a_config_error(tmp_path: Path) -> None:
    """A worker given a CA file that does not exist, or is not PEM, fails with a ConfigError."""
    missing, garbage = str(tmp_path / "missing.pem"), str(tmp_path / "garbage.pem")
    Path(garbage).write_text("not a certificate\n")
    backend = DemoBackend(BackendSettings(url=""))

    with pytest.raises(ConfigError) as not_found:
        Agent(WorkConfig(ca_file=missing), backend)
    with pytest.raises(ConfigError) as unreadable:
        Agent(WorkConfig(ca_file=garbage), backend)

    assert f"CA file not found: {missing}" == str(not_found.value)
    assert str(unreadable.value).startswith(f"cannot read CA file {garbage!r}")


# --- the command line -----------------------------------------------------------------------


#: ``serve`` in a cluster (a Redis nobody listens on: the errors come before it is dialled).
CLUSTER = ["serve", "--cluster-url", "redis://127.0.0.1:1", "--cluster-key", "k"]
PROCESSES = [*CLUSTER, "--processes", "2", "--port", "1"]


def assert_one_error_line(stderr: str, *fragments: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert 1 == len(lines), stderr
    assert lines[0].startswith("llamapool: error: ")
    assert [] == [f for f in fragments if f not in lines[0]]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["serve", "--tls-cert", "{missing}", "--tls-key", "{key}"], ["TLS file not found"]),
        (["serve", "--tls-cert", "{cert}"], ["TLS needs both TLS_CERT and TLS_KEY"]),
        (["serve", "--tls-cert", "{cert}", "--tls-key", "{other_key}"], ["cannot use TLS_CERT"]),
        (["work", "--backend", "demo", "--ca-file", "{missing}"], ["CA file not found"]),
        (
            ["serve", "--tls-cert", "{cert}", "--tls-key", "{encrypted_key}"],
            ["TLS_KEY", "is encrypted with a passphrase (not supported)"],
        ),
        ([*CLUSTER, "--cluster-ca-file", "{missing}"], ["CLUSTER_CA_FILE not found: "]),
        ([*CLUSTER, "--cluster-ca-file", "{key}"], ["cannot read CLUSTER_CA_FILE"]),
        (
            [*PROCESSES, "--tls-cert", "{missing}", "--tls-key", "{key}"],
            ["TLS file not found"],
        ),
    ],
    ids=[
        "serve-missing-file",
        "serve-cert-only",
        "serve-mismatched",
        "work-missing-ca",
        "serve-encrypted-key",
        "cluster-missing-ca",
        "cluster-ca-not-pem",
        "processes-missing-file",
    ],
)
def test_the_cli_refuses_unusable_tls_settings_in_one_line(
    certs: Certs, tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    """Unusable TLS flags end the process with one clear error line and exit code 1."""
    names = {"missing": str(tmp_path / "missing.pem"), **attrs.asdict(certs)}
    argv = [arg.format_map({k: str(v) for k, v in names.items()}) for arg in args]
    if argv[0] == "serve":
        argv += ["--host", "127.0.0.1"] + ([] if "--port" in argv else ["--port", "0"])
    else:
        argv += ["--server-url", "wss://127.0.0.1:9/workers/connect"]

    result = run_cli(*argv)

    assert 1 == result.returncode
    assert_one_error_line(result.stderr, *fragments)


async def test_a_cli_pool_runs_over_tls(certs: Certs) -> None:
    """``serve`` with TLS_CERT and TLS_KEY serves https://; ``work --ca-file`` joins over
    wss:// and answers; ``work --tls-insecure`` joins too and warns that it does not verify."""
    server_env = cli_env(
        API_KEY=API_KEY, WORKER_KEY=WORKER_KEY, TLS_CERT=str(certs.cert), TLS_KEY=str(certs.key)
    )
    async with cli_process("serve", "--host", "127.0.0.1", "--port", "0", env=server_env) as srv:
        url = str((await srv.event("server_listening"))["url"])
        worker_env = cli_env(SERVER_URL=ws_url(url), WORKER_KEY=WORKER_KEY)
        async with (
            cli_process(
                "work", "--backend", "demo", "--ca-file", str(certs.ca), env=worker_env
            ) as verifying,
            cli_process("work", "--backend", "demo", "--tls-insecure", env=worker_env) as insecure,
        ):
            await verifying.event("worker_registered")
            await insecure.event("worker_registered")
            warning = await insecure.event("tls_verification_disabled")
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    url + "/v1/chat/completions",
                    json=CHAT,
                    headers={"Authorization": f"Bearer {API_KEY}"},
                    ssl=trusting(certs),
                ) as resp,
            ):
                answer = await resp.json()
            health = await healthz(url, certs)

    assert url.startswith("https://127.0.0.1:")
    assert (200, "echo: over tls") == (resp.status, answer["choices"][0]["message"]["content"])
    assert 2 == health["workers"]
    assert "warning" == warning["level"]
    assert [] == [e for e in verifying.events if e.get("event") == "tls_verification_disabled"]


async def test_servers_of_a_cluster_talk_over_tls(certs: Certs) -> None:
    """With TLS on each server, a request crosses to the other server over HTTPS, its
    certificate checked against CLUSTER_CA_FILE."""
    async with running_redis(unix_socket=False) as redis:
        cluster = {
            "cluster_url": redis.url,
            "cluster_keys": "tls-cluster-key",
            "cluster_ca_file": str(certs.ca),
        }
        async with tls_pool(certs, **cluster) as a_url, tls_pool(certs, **cluster) as b_url:
            assert b_url.startswith("https://")
            async with demo_worker(wss(b_url), ca_file=str(certs.ca)) as agent:
                await registered(agent)
                async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=trusting(certs)),
                    headers={"Authorization": f"Bearer {API_KEY}"},
                ) as http:

                    async def listed_on_a() -> bool:
                        async with http.get(a_url + "/v1/models") as response:
                            return bool((await response.json())["data"])

                    await wait_for(listed_on_a, timeout=10, what="the worker listed on A")
                    async with http.post(a_url + "/v1/chat/completions", json=CHAT) as response:
                        answer = await response.json()
    assert "over tls" in answer["choices"][0]["message"]["content"]
