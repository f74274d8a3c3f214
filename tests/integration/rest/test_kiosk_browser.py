"""The kiosk page in a real browser (Debian's Chromium, driven by Playwright): a digit drawn on
the canvas is answered at once, provisionally while the link to the cloud is cut, and the
cloud's answer replaces it in place when the link returns. And a page served from another
origin may call the agent only when the operator allowed that origin.
"""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edge_agent.rest import KIOSK_DIR
from model_runtime.demo import CLOUD_REPOSITORY, EDGE_REPOSITORY
from tests.integration.conftest import agent_metric, start_agent, start_agent_with_cloud
from tests.integration.gateway.helpers import Gateway
from tests.integration.rest.helpers import rest_ready
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import Daemon, wait_until

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
# Never a browser of Playwright's own (nothing may be downloaded here): Debian's, headless, with
# everything that would reach for the network off.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EDGE = ort.InferenceSession(str(EDGE_REPOSITORY / "digits" / "1" / "model.onnx"))
CLOUD = ort.InferenceSession(str(CLOUD_REPOSITORY / "digits-large" / "1" / "model.onnx"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: scripts/test.sh installs it when run as root")
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    yield context.new_page()
    context.close()


def draw_a_seven(page: Any) -> None:
    box = page.locator("#pad").bounding_box()
    points = [(60, 50), (220, 50), (200, 110), (120, 240)]
    page.mouse.move(box["x"] + points[0][0], box["y"] + points[0][1])
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + x, box["y"] + y, steps=12)
    page.mouse.up()


def classify(page: Any) -> np.ndarray:
    """Press Classify; the input the page sent, as the model sees it."""
    with page.expect_request("**/v2/models/digits/infer") as sent:
        page.click("#classify")
    values = json.loads(sent.value.post_data)["inputs"][0]["data"]
    return np.asarray(values, dtype=np.float32).reshape(1, 64)


@pytest.mark.parametrize("token", [None, "kiosk-token-0123456789abcdef"], ids=["open", "token"])
def test_the_page_shows_a_provisional_answer_then_the_clouds(
    tmp_path: Path, gateway: Gateway, proxy: FaultProxy, page: Any, token: str | None
) -> None:
    # With a token, the page sends it on every call and reads the results stream with fetch
    # (EventSource cannot send one); without, EventSource reads it.
    args: list[str] = []
    if token is not None:
        token_file = tmp_path / "tokens"
        token_file.write_text(f"kiosk-7 {token}\n")
        token_file.chmod(0o600)
        args = ["--token-file", str(token_file)]
    agent = start_agent_with_cloud(tmp_path, gateway, proxy, *args, ready=rest_ready)
    try:
        proxy.cut()
        fragment = f"#token={token}" if token is not None else ""
        page.goto(f"http://{agent.address('rest')}/kiosk/?escalation=always{fragment}")
        result = page.locator("#result")
        footer = page.locator("#link")
        playwright.expect(footer).to_contain_text("cloud link: down", timeout=30_000)

        draw_a_seven(page)
        x = classify(page)
        assert x.sum() > 0
        assert x.max() <= 16
        # At once, with the link still cut: the device's answer, marked provisional.
        playwright.expect(result).to_have_attribute("data-state", "provisional", timeout=10_000)
        edge_label = int(EDGE.run(["label"], {"X": x})[0][0])
        playwright.expect(page.locator("#answer")).to_have_text(str(edge_label))
        playwright.expect(page.locator("#source")).to_contain_text(
            "the cloud's answer will replace it"
        )
        playwright.expect(page.locator("#confidence")).to_contain_text("% sure")

        proxy.restore()
        # The cloud's answer, in place, once the queue drains.
        playwright.expect(result).to_have_attribute("data-state", "final", timeout=60_000)
        cloud_label = int(CLOUD.run(["label"], {"X": x})[0][0])
        playwright.expect(page.locator("#answer")).to_have_text(str(cloud_label))
        playwright.expect(page.locator("#source")).to_contain_text("answered by the cloud model")
    finally:
        agent.stop()


@pytest.fixture
def elsewhere() -> Iterator[str]:
    """The kiosk page served by another web server: another origin than the agent's."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(KIOSK_DIR))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_page_from_an_allowed_origin_may_call_the_agent(
    tmp_path: Path, elsewhere: str, agent: Daemon, page: Any
) -> None:
    allowing = start_agent(tmp_path, "--rest-cors-origin", elsewhere)
    try:
        page.goto(
            f"{elsewhere}/index.html?agent=http://{allowing.address('rest')}&escalation=never"
        )
        draw_a_seven(page)
        x = classify(page)
        playwright.expect(page.locator("#result")).to_have_attribute("data-state", "edge")
        edge_label = int(EDGE.run(["label"], {"X": x})[0][0])
        playwright.expect(page.locator("#answer")).to_have_text(str(edge_label))
    finally:
        allowing.stop()

    # The agent of the module allows no origin: the browser gets nothing it may read.
    refused_before = agent_metric(agent, "edge_agent_http_requests_total", code="403")
    page.goto(f"{elsewhere}/index.html?agent=http://{agent.address('rest')}")
    draw_a_seven(page)
    page.click("#classify")
    playwright.expect(page.locator("#result")).to_have_attribute("data-state", "error")
    playwright.expect(page.locator("#source")).to_contain_text("The agent did not answer")
    wait_until(
        lambda: agent_metric(agent, "edge_agent_http_requests_total", code="403") > refused_before,
        what="the refusal counted",
    )
