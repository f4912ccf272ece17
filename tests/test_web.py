"""service/web.py and service/static/index.html: the page is served self-contained, and headless Chromium
(Debian's /usr/bin/chromium through selenium, never a downloaded browser) drives it against a real uvicorn
server on loopback: mint, nearest experts, adapter vs base model, download."""

from __future__ import annotations

import io
import re
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import test_service
from fastapi.testclient import TestClient
from test_service import BASE, KEY, _free_port, make_app

from loramint.adapters import CONFIG_FILE, WEIGHTS_FILE

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 90
world = test_service.world  # the service tests' fixture: tiny-llama, a small library and generator


def test_the_page_is_served_self_contained(world):
    with TestClient(make_app(world)) as c:
        response = c.get("/")
        assert "/" not in c.app.openapi()["paths"]  # a page, not part of the API
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    html = response.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing from a CDN: works offline
    for path in ("/v1/adapters", "/v1/retrieve", "/v1/chat/completions", "/healthz"):
        assert f'"{path}"' in html
    for field in ("api-key", "description", "examples", "prompt", "max-tokens"):  # every field is labelled
        assert f'<label for="{field}">' in html and f'id="{field}"' in html


# ---- a real browser ----------------------------------------------------------------------------------------
@contextmanager
def serving(app) -> Iterator[str]:
    """`app` in a uvicorn server on a loopback port, in a thread of this process; yields its URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(world):
    with serving(make_app(world)) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is missing: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1024"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))
    driver.downloads = downloads
    yield driver
    driver.quit()


def _text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).get_property("textContent")


def _visible_error(driver, element_id: str) -> str:
    element = driver.find_element("id", element_id)
    return element.get_property("textContent") if element.is_displayed() else ""


def test_mint_retrieve_compare_and_download_in_chromium(server, browser):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    browser.get(f"{server}/")
    wait.until(lambda d: BASE in _text(d, "service-info"))
    description = browser.find_element("id", "description")
    description.send_keys("Add the two numbers.")
    browser.find_element("id", "examples").send_keys("1 + 2 = 3", Keys.ENTER, Keys.ENTER, "4 + 4 = 8")

    # without a key the API's own message shows on the page
    browser.find_element("id", "mint").click()
    wait.until(lambda d: "API key" in _visible_error(d, "mint-error"))
    assert _text(browser, "mint-error").startswith("401: ")

    # with one, minted from the keyboard alone (Ctrl+Enter in the description)
    browser.find_element("id", "api-key").send_keys(KEY)
    description.send_keys(Keys.CONTROL, Keys.ENTER)
    wait.until(lambda d: _text(d, "adapter-id").startswith("minted-"))
    adapter_id = _text(browser, "adapter-id")
    assert not browser.find_element("id", "mint-error").is_displayed()
    info = httpx.get(f"{server}/v1/adapters/{adapter_id}").json()
    assert info["description"] == "Add the two numbers." and info["metrics"]["minted"]["examples"] == 2

    # the nearest experts, as POST /v1/retrieve ranks them
    wait.until(lambda d: d.find_elements("css selector", "#experts tbody tr"))
    rows = browser.find_elements("css selector", "#experts tbody tr")
    expected = httpx.post(f"{server}/v1/retrieve", json={"description": "Add the two numbers.", "k": 5})
    hits = expected.json()["data"]
    assert [r.get_attribute("data-expert") for r in rows] == [h["id"] for h in hits] and len(rows) == 5
    shown = [float(r.find_element("css selector", "td.score").text) for r in rows]
    assert shown == pytest.approx([h["score"] for h in hits], abs=1e-3)

    # adapter vs base model, streamed, side by side: the same texts as the API gives without streaming
    prompt = browser.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys("1 + 2 =")
    tokens = browser.find_element("id", "max-tokens")
    tokens.clear()
    tokens.send_keys("8")
    browser.find_element("id", "compare").send_keys(Keys.ENTER)
    done = ("done", "error")
    wait.until(lambda d: all(_state(d, f"{p}-output") in done for p in ("adapter", "base")))
    for pane, model in (("adapter", adapter_id), ("base", BASE)):
        assert _state(browser, f"{pane}-output") == "done", _text(browser, f"{pane}-error")
        body = {"model": model, "messages": [{"role": "user", "content": "1 + 2 ="}], "max_tokens": 8}
        answer = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).json()
        text = answer["choices"][0]["message"]["content"] or "(empty answer)"
        assert _text(browser, f"{pane}-output") == text
        assert f"{answer['usage']['completion_tokens']} tokens" in _text(browser, f"{pane}-meta")
    assert adapter_id in _text(browser, "adapter-pane-heading") and BASE in _text(
        browser, "base-pane-heading"
    )

    # the download link is the API's zip: a stock PEFT folder
    link = browser.find_element("id", "download")
    response = httpx.get(link.get_attribute("href"))
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        names = {Path(n).name for n in archive.namelist()}
    assert names == {CONFIG_FILE, WEIGHTS_FILE}

    # ...and following it from the keyboard saves that zip
    link.send_keys(Keys.ENTER)
    saved = browser.downloads / f"{adapter_id}.zip"
    wait.until(lambda _: saved.exists() and saved.stat().st_size == len(response.content))
    assert saved.read_bytes() == response.content
    assert not browser.find_element("id", "download-error").is_displayed()


def _state(driver, element_id: str) -> str | None:
    return driver.find_element("id", element_id).get_attribute("data-state")


def test_a_failed_completion_shows_the_api_message(server, browser):
    """An adapter dropped from the service meanwhile: the page shows the 404's message in that pane."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/")
    WebDriverWait(browser, WAIT_S).until(lambda d: BASE in _text(d, "service-info"))
    browser.execute_script(
        "showAdapter(arguments[0]);",
        {
            "id": "no-such-adapter",
            "stored": False,
            "base_model": "tiny-llama",
            "rank": 2,
            "alpha": 4.0,
            "num_modules": 4,
            "target_modules": ["q_proj"],
            "nbytes": 1024,
            "download_url": "/v1/adapters/no-such-adapter/download",
        },
    )
    browser.find_element("id", "prompt").send_keys("hello")
    browser.find_element("id", "compare").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: _state(d, "adapter-output") == "error")
    assert "404: model 'no-such-adapter' does not exist" in _visible_error(browser, "adapter-error")
    browser.find_element("id", "download").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: _visible_error(d, "download-error"))
    assert _text(browser, "download-error").startswith("404: ")


def test_with_auth_all_the_page_sends_the_key_on_reads_too(world, browser):
    """Under `auth: all` retrieval, completions and the download need the key as well: the page sends it."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    with serving(make_app(world, auth="all")) as url:
        browser.get(f"{url}/")
        wait.until(lambda d: BASE in _text(d, "service-info"))  # /healthz stays open
        browser.find_element("id", "api-key").send_keys(KEY)
        browser.find_element("id", "description").send_keys("Multiply the numbers.", Keys.CONTROL, Keys.ENTER)
        wait.until(lambda d: d.find_elements("css selector", "#experts tbody tr"))
        adapter_id = _text(browser, "adapter-id")
        assert httpx.get(f"{url}/v1/adapters/{adapter_id}/download").status_code == 401
        browser.find_element("id", "compare").click()
        wait.until(lambda d: all(_state(d, f"{p}-output") in ("done", "error") for p in ("adapter", "base")))
        assert _state(browser, "adapter-output") == _state(browser, "base-output") == "done"
        browser.find_element("id", "download").click()
        saved = browser.downloads / f"{adapter_id}.zip"
        wait.until(lambda _: saved.exists() and zipfile.is_zipfile(saved))
        assert not _visible_error(browser, "experts-error") and not _visible_error(browser, "download-error")


LONG_ID = "a-very-long-expert-identifier-without-any-spaces-" + "x" * 70
LONG_DESCRIPTION = ("Add the two numbers, then explain the carrying step by step. " * 8)[:500]


@pytest.mark.parametrize("width", [1280, 390])
def test_the_page_lays_out_at_desktop_and_phone_widths(server, browser, width, tmp_path):
    """With a long unbroken expert id and a 500-character description (the limit) among the nearest experts, the page
    has no horizontal overflow and no table taller than the viewport, at 1280 px and at 390 px (a phone)."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from loramint.adapters import LoraAdapter

    headers = {"Authorization": f"Bearer {KEY}"}
    data = test_service.adapter_zip(LoraAdapter.random("tiny-llama", r=2, seed=11))
    files = {"file": ("adapter.zip", data, "application/zip")}
    form = {"description": LONG_DESCRIPTION, "id": LONG_ID, "family": "a-long-family-name-too"}
    response = httpx.post(f"{server}/v1/experts", files=files, data=form, headers=headers)
    assert response.status_code == 201, response.text
    try:
        browser.set_window_size(width, 900)
        browser.get(f"{server}/")
        wait = WebDriverWait(browser, WAIT_S)
        wait.until(lambda d: BASE in _text(d, "service-info"))
        key = browser.find_element("id", "api-key")
        key.clear()  # an earlier test's key stays in the tab's sessionStorage
        key.send_keys(KEY)
        description = browser.find_element("id", "description")
        description.clear()
        description.send_keys("Add the two numbers and explain the carrying.", Keys.CONTROL, Keys.ENTER)
        wait.until(lambda d: d.find_elements("css selector", "#experts tbody tr"))
        shown = [
            r.get_attribute("data-expert") for r in browser.find_elements("css selector", "#experts tbody tr")
        ]
        assert LONG_ID in shown, (shown, browser.get_log("browser"))
        layout = browser.execute_script(
            "const tables = [...document.querySelectorAll('table')].filter(t => t.offsetParent !== null);"
            "return {viewport: window.innerWidth, height: window.innerHeight,"
            " scroll: document.documentElement.scrollWidth,"
            " tables: tables.map(t => t.getBoundingClientRect().height)};"
        )
        assert browser.get_screenshot_as_file(str(tmp_path / f"page-{width}.png"))
        assert layout["tables"], "the experts table is not shown"
        assert layout["scroll"] <= layout["viewport"], f"horizontal overflow at {width} px: {layout}"
        assert max(layout["tables"]) <= layout["height"], f"a table taller than the viewport: {layout}"
    finally:
        httpx.delete(f"{server}/v1/experts/{LONG_ID}", headers=headers)
        browser.set_window_size(1280, 1024)
