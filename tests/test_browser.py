"""The live view (`GET /`) in a real browser, against a live gateway and a real nats-server.

The browser is Debian's `chromium` (on PATH, or /usr/bin/chromium) driven by Playwright for
Python; Playwright's own browser download is never used. Each gateway is `python -m gateway`
as a child process, so a restart is a real SIGTERM and a real new process on the same port.
Waits are Playwright's auto-retrying `expect` and `wait_until`, with deadlines scaled by
GATEWAY_TEST_TIMEOUT_FACTOR; nothing sleeps.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from playwright.async_api import (
    APIRequestContext,
    Browser,
    Page,
    Playwright,
    async_playwright,
    expect,
)
from prometheus_client.parser import text_string_to_metric_families

from gateway.natsserver import NatsServer

from conftest import GatewayProcess, jetstream, publish_json, seconds, wait_until


def _find_chromium() -> str | None:
    found = shutil.which("chromium")
    if found is None and os.access("/usr/bin/chromium", os.X_OK):
        found = "/usr/bin/chromium"
    return found


CHROMIUM = _find_chromium()
# As the machine notes prescribe; the background-networking flags keep Chromium from
# calling home (the closed network here refuses it, noisily).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)"
)
pytestmark = pytest.mark.anyio

StartGateway = Callable[..., GatewayProcess]


def ms(n: float) -> float:
    """A Playwright timeout (milliseconds) of `n` seconds, scaled for slow machines."""
    return seconds(n) * 1000


def payload(seq: int, spot: float) -> dict[str, Any]:
    """A levels.signals payload shaped like the synthetic publisher's, around `spot`."""
    kinds = ("support", "resistance", "gamma_wall", "vwap", "pivot", "support")
    offsets = (-6.0, -3.5, -1.25, 1.5, 3.75, 6.5)
    return {
        "schema": "levels.signals.v1",
        "ts": time.time(),
        "seq": seq,
        "spy": {"spot": spot, "bid": round(spot - 0.01, 2), "ask": round(spot + 0.01, 2)},
        "levels": [
            {"price": round(spot + off, 2), "kind": kind, "strength": round(0.15 * (i + 1), 3)}
            for i, (kind, off) in enumerate(zip(kinds, offsets, strict=True))
        ],
        "viewport": {"min": round(spot - 10, 2), "max": round(spot + 10, 2)},
    }


def unique_spot() -> float:
    """A spot no other payload in the test has: the page can only show it if it got it."""
    return round(random.uniform(700, 799), 2)


@pytest.fixture
async def playwright() -> AsyncIterator[Playwright]:
    async with async_playwright() as pw:
        yield pw


@pytest.fixture
async def http(playwright: Playwright) -> AsyncIterator[APIRequestContext]:
    """Plain HTTP requests (no browser needed), e.g. for /metrics and /ready."""
    context = await playwright.request.new_context()
    yield context
    await context.dispose()


@pytest.fixture
async def browser(playwright: Playwright) -> AsyncIterator[Browser]:
    assert CHROMIUM is not None, "tests that launch a browser are marked needs_chromium"
    browser = await playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
    )
    yield browser
    await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh page; an uncaught error in the page's script fails the test."""
    context = await browser.new_context(viewport={"width": 820, "height": 640})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    await context.close()
    assert not errors, f"uncaught errors in the live view: {errors}"


async def start_gateway(
    gateway_process: StartGateway, http: APIRequestContext, env: dict[str, str]
) -> tuple[GatewayProcess, int]:
    """Start `python -m gateway` and wait until it serves and its relay is subscribed."""
    proc = gateway_process({"GATEWAY_DRAIN_S": "0", **env})
    port = await anyio.to_thread.run_sync(proc.wait_started)

    async def ready() -> bool:
        return (await http.get(f"http://127.0.0.1:{port}/ready")).ok

    await wait_until(ready, what="the gateway to be ready")
    return proc, port


async def rejected(http: APIRequestContext, port: int, reason: str) -> float:
    """gateway_connections_rejected_total{reason=...} from the gateway's /metrics."""
    text = await (await http.get(f"http://127.0.0.1:{port}/metrics")).text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "gateway_connections_rejected_total"
                and sample.labels.get("reason") == reason
            ):
                return sample.value
    return 0.0


@needs_chromium
async def test_page_shows_the_value_just_published(
    nats_server: NatsServer, gateway_process: StartGateway, http: APIRequestContext, page: Page
) -> None:
    """The page connects (passing its own ?token= on), shows a fresh payload, and ticks."""
    token = "live-view-token"
    _, port = await start_gateway(
        gateway_process, http, {"NATS_URL": nats_server.url, "GATEWAY_AUTH_TOKEN": token}
    )
    response = await page.goto(f"http://127.0.0.1:{port}/?token={token}")
    assert response is not None
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/html")
    state = page.get_by_test_id("state")
    await expect(state).to_have_attribute("data-state", "open", timeout=ms(10))

    spot = unique_spot()
    doc = payload(41, spot)
    async with jetstream(nats_server.url) as js:
        await publish_json(js, doc)

    await expect(page.get_by_test_id("spot")).to_have_text(f"{spot:.2f}", timeout=ms(10))
    await expect(page.get_by_test_id("seq")).to_have_text("41")
    await expect(page.get_by_test_id("bid")).to_have_text(f"{spot - 0.01:.2f}")
    rows = page.get_by_test_id("levels").locator("tr[data-level]")
    await expect(rows).to_have_count(len(doc["levels"]))
    top = max(level["price"] for level in doc["levels"])
    await expect(rows.first.locator("td").first).to_have_text(f"{top:.2f}")
    vp = doc["viewport"]
    await expect(page.get_by_test_id("viewport")).to_have_text(
        f"{vp['min']:.2f} \N{EN DASH} {vp['max']:.2f}"
    )
    await expect(page.locator("body")).not_to_contain_text(token)  # used, never displayed
    # Chromium offers permessage-deflate and gets it: the page renders compressed frames.
    extensions = await page.evaluate(
        """(url) => new Promise((resolve, reject) => {
            const ws = new WebSocket(url);
            ws.onopen = () => { resolve(ws.extensions); ws.close(); };
            ws.onerror = () => reject(new Error("no connection"));
        })""",
        f"ws://127.0.0.1:{port}/ws/stream?token={token}",
    )
    assert extensions.startswith("permessage-deflate")
    assert "server_no_context_takeover" in extensions

    # The age of the last update ticks on its own, with no new data.
    age = page.get_by_test_id("age")
    seconds_ago = re.compile(r"^\d+\.\d s$")
    await expect(age).to_have_text(seconds_ago)
    first = await age.text_content()
    await expect(age).not_to_have_text(first or "", timeout=ms(3))
    await expect(age).to_have_text(seconds_ago)

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "live-view.png", full_page=True)


@needs_chromium
async def test_page_reconnects_after_a_gateway_restart(
    nats_server: NatsServer, gateway_process: StartGateway, http: APIRequestContext, page: Page
) -> None:
    """SIGTERM the gateway, start a new one on the same port: the page reconnects unaided."""
    env = {"NATS_URL": nats_server.url}
    first, port = await start_gateway(gateway_process, http, env)
    await page.goto(f"http://127.0.0.1:{port}/")
    state = page.get_by_test_id("state")
    spot = page.get_by_test_id("spot")
    async with jetstream(nats_server.url) as js:
        before = unique_spot()
        await publish_json(js, payload(1, before))
        await expect(spot).to_have_text(f"{before:.2f}", timeout=ms(10))
        await expect(state).to_have_attribute("data-opens", "1")

        first.proc.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(first.wait_exit) == 0, first.output
        await expect(state).to_have_attribute("data-state", "closed", timeout=ms(5))

        await start_gateway(gateway_process, http, {**env, "GATEWAY_PORT": str(port)})
        after = unique_spot()
        while after == before:
            after = unique_spot()
        await publish_json(js, payload(2, after))
        # Backoff: full jitter, so the page's next attempt is at most a few seconds away.
        await expect(spot).to_have_text(f"{after:.2f}", timeout=ms(15))
    await expect(state).to_have_attribute("data-state", "open")
    await expect(state).to_have_attribute("data-opens", "2")
    await expect(page.get_by_test_id("seq")).to_have_text("2")


@needs_chromium
async def test_foreign_origin_is_refused(
    nats_server: NatsServer, gateway_process: StartGateway, http: APIRequestContext, page: Page
) -> None:
    """With an Origin allow-list that excludes the page, its WebSocket is refused (403)."""
    _, port = await start_gateway(
        gateway_process,
        http,
        {"NATS_URL": nats_server.url, "GATEWAY_ALLOWED_ORIGINS": "https://app.example.com"},
    )
    await page.goto(f"http://127.0.0.1:{port}/")

    async def refused_twice() -> bool:  # the first attempt and at least one backed-off retry
        return await rejected(http, port, "origin") >= 2

    await wait_until(refused_twice, what="two origin refusals in /metrics")
    state = page.get_by_test_id("state")
    await expect(state).to_have_attribute("data-state", re.compile("^(closed|connecting)$"))
    await expect(state).to_have_attribute("data-opens", "0")
    await expect(page.get_by_test_id("spot")).to_have_text("—")


async def test_live_view_can_be_turned_off(
    nats_server: NatsServer, gateway_process: StartGateway, http: APIRequestContext
) -> None:
    """GATEWAY_LIVE_VIEW=0: `GET /` is 404; the rest of the service is unaffected."""
    _, port = await start_gateway(
        gateway_process, http, {"NATS_URL": nats_server.url, "GATEWAY_LIVE_VIEW": "0"}
    )
    assert (await http.get(f"http://127.0.0.1:{port}/")).status == 404
    assert (await http.get(f"http://127.0.0.1:{port}/health")).status == 200


@needs_chromium
async def test_event_source_gets_the_cached_and_then_each_new_payload(
    nats_server: NatsServer, gateway_process: StartGateway, http: APIRequestContext, page: Page
) -> None:
    """Chromium's EventSource on /sse/stream: the cached payload, then a new one, ids set."""
    _, port = await start_gateway(gateway_process, http, {"NATS_URL": nats_server.url})
    async with jetstream(nats_server.url) as js:
        first = await publish_json(js, payload(1, 600.5))

        async def cached() -> bool:
            health = await (await http.get(f"http://127.0.0.1:{port}/health")).json()
            return health["last_message_ts"] is not None

        await wait_until(cached, what="a cached payload")
        await page.goto(f"http://127.0.0.1:{port}/")
        await page.evaluate(
            """() => {
                window.received = [];
                const source = new EventSource("/sse/stream");
                source.onmessage = (e) =>
                    window.received.push([e.lastEventId, JSON.parse(e.data).seq]);
            }"""
        )
        await page.wait_for_function("window.received.length >= 1", timeout=ms(10))
        second = await publish_json(js, payload(2, 601.5))
        await page.wait_for_function("window.received.length >= 2", timeout=ms(10))
    received = await page.evaluate("window.received")
    assert received[:2] == [[str(first), 1], [str(second), 2]]
