"""The attribution explorer page in a real headless Chromium, against `gda serve`'s app running in uvicorn over
the served home: an upload and a generated query each end in a gallery of the top-k training images.

A screenshot of each gallery is kept (see conftest.py for the browser and where screenshots go).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn
from playwright.sync_api import Browser, Page, expect

from gda.api import create_app
from gda.service import open_engine
from servicekit import ServedHome
from shardkit import png

START_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def base_url(served_home: ServedHome) -> Iterator[str]:
    """`gda serve`'s app on a loopback port of its own, in a background thread."""
    # A socket bound here, handed to uvicorn, cannot lose its free port to another process in between.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    host, port = listener.getsockname()
    with open_engine(served_home.home, "tiny", interface="http") as engine:
        server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                pytest.fail(f"uvicorn did not start on {host}:{port} within {START_TIMEOUT_S:g} s")
            time.sleep(0.05)
        yield f"http://{host}:{port}"
        server.should_exit = True
        thread.join(timeout=START_TIMEOUT_S)
    listener.close()


@pytest.fixture
def page(browser: Browser, base_url: str) -> Iterator[Page]:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(base_url)
    yield page
    page.close()


def expect_gallery(page: Page, served_home: ServedHome, k: int) -> None:
    """k cards ranked 1..k, each a training image (loaded) with its caption, plus the versions that answered."""
    cards = page.locator("#gallery .card")
    expect(cards).to_have_count(k)
    assert cards.locator(".rank").all_inner_texts() == [f"rank {rank}" for rank in range(1, k + 1)]
    assert all(caption in served_home.captions.values() for caption in cards.locator(".caption").all_inner_texts())
    page.wait_for_function("[...document.querySelectorAll('#gallery img, #query img')].every(i => i.complete && i.naturalWidth > 0)")
    expect(page.locator("#versions")).to_contain_text(f"index {served_home.index_version}")
    expect(page.locator("#error")).to_be_hidden()


def test_an_uploaded_image_shows_its_gallery_in_the_browser(
    page: Page, served_home: ServedHome, tmp_path: Path, screenshot: Callable[[Page, str], Path]
) -> None:
    upload = page.locator("#upload")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    upload.locator("input[name=image]").set_input_files(not_an_image)
    upload.locator("input[name=prompt]").fill("a red square")
    upload.get_by_role("button", name="Attribute").click()
    expect(page.locator("#error")).to_have_text("not a decodable image: Pillow recognises no image format in these bytes")

    image = tmp_path / "query.png"
    image.write_bytes(png((20, 20), (220, 30, 30)))
    upload.locator("input[name=image]").set_input_files(image)
    upload.locator("input[name=top_k]").fill("3")
    upload.get_by_role("button", name="Attribute").click()
    expect_gallery(page, served_home, 3)
    expect(page.locator("#prompt")).to_have_text("“a red square”")
    assert page.locator("#gallery .source").first.get_attribute("href").startswith("https://example.test/")
    screenshot(page, "explorer_upload.png")


def test_a_generated_query_picked_shows_its_gallery_in_the_browser(
    page: Page, served_home: ServedHome, screenshot: Callable[[Page, str], Path]
) -> None:
    query_id, prompt = list(served_home.query_prompts.items())[-1]
    pick = page.locator("#pick")
    expect(pick.locator("option")).to_have_count(len(served_home.query_prompts))
    pick.locator("select").select_option(str(query_id))
    pick.get_by_role("button", name="Attribute").click()
    expect_gallery(page, served_home, 5)
    expect(page.locator("#prompt")).to_have_text(f"“{prompt}”")
    screenshot(page, "explorer_generated_query.png")
