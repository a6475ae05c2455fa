"""The attribution explorer page in a real headless Chromium, against `gda serve`'s app running in uvicorn over
the served home: an upload and a generated query each end in a gallery of the top-k training images, and
against an app with a token the page asks for it, then shows the gallery with the images fetched with it.

A screenshot of each gallery is kept (see conftest.py for the browser and where screenshots go).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect
from servicekit import ServedHome
from shardkit import png

from bench.load import serving
from gda.api import create_app
from gda.service import AttributionEngine, open_engine

TOKEN = secrets.token_urlsafe(16)


@pytest.fixture(scope="module")
def engine(served_home: ServedHome) -> Iterator[AttributionEngine]:
    with open_engine(served_home.home, "tiny", interface="http") as engine:
        yield engine


@pytest.fixture(scope="module")
def base_url(engine: AttributionEngine) -> Iterator[str]:
    """`gda serve`'s app on a loopback port of its own, in a background thread."""
    with serving(create_app(engine)) as url:
        yield url


@pytest.fixture(scope="module")
def locked_url(engine: AttributionEngine) -> Iterator[str]:
    """The same, started with a token (GDA_API_TOKEN)."""
    with serving(create_app(engine, token=TOKEN)) as url:
        yield url


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
    page.wait_for_function(
        "[...document.querySelectorAll('#gallery img, #query img')].every(i => i.complete && i.naturalWidth > 0)"
    )
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
    expect(page.locator("#error")).to_have_text(
        "not a decodable image: Pillow recognises no image format in these bytes"
    )

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


def test_with_a_token_the_page_asks_for_it_and_sends_it(
    browser: Browser, locked_url: str, served_home: ServedHome, screenshot: Callable[[Page, str], Path]
) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(locked_url)
    token = page.locator("#token")
    expect(token).to_be_visible()
    expect(page.locator("#error")).to_contain_text("this API needs its token")
    expect(page.locator("#pick option")).to_have_count(0)

    token.locator("input").fill("not the token")
    token.get_by_role("button", name="Use token").click()
    page.wait_for_function("sessionStorage.getItem('gda-api-token') === null")  # refused, so forgotten
    expect(token).to_be_visible()  # and asked for again
    token.locator("input").fill(TOKEN)
    token.get_by_role("button", name="Use token").click()
    expect(token).to_be_hidden()
    expect(page.locator("#health")).to_contain_text(f"index {served_home.index_version}")

    pick = page.locator("#pick")
    expect(pick.locator("option")).to_have_count(len(served_home.query_prompts))
    pick.get_by_role("button", name="Attribute").click()
    expect_gallery(page, served_home, 5)  # the training images too came through with the token
    assert page.evaluate("sessionStorage.getItem('gda-api-token')") == TOKEN
    screenshot(page, "explorer_with_token.png")

    page.reload()  # the tab keeps the token: no second prompt
    expect(page.locator("#pick option")).to_have_count(len(served_home.query_prompts))
    expect(token).to_be_hidden()
    page.close()
