"""The app in a real headless browser (Chromium through Selenium): log in with the form, see the media (the CSP
lets them through), answer with the keyboard shortcut (static JS runs under the CSP), and the vote is in the
database. Needs `make browser-deps` (Debian's chromium + chromium-driver, and selenium); skipped otherwise."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mmalign.annotate.db import Judgement, init_database
from mmalign.annotate.people import add_user
from mmalign.annotate.tasks import add_task
from tests.annotate import media
from tests.annotate.server import Server

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (make browser-deps)")
# a page that set window.voted has been replaced by the answer's page once the flag is gone
REPLACED = "return window.voted === undefined && document.readyState === 'complete'"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="no chromium + chromedriver on PATH (make browser-deps installs them)"
)


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_login_see_media_and_vote_with_the_keyboard(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    db = init_database(tmp_path / "a.db")[0]
    token = add_user(db, "alice")
    add_task(db, "arena", "pairwise", media.manifest_folder(tmp_path / "m", items=2), judgements=1)
    server = Server(Path(db.url[len("sqlite:///") :]), tmp_path / "server.log")
    try:
        wait = WebDriverWait(browser, 20)
        browser.get(server.url + "/")
        wait.until(ec.presence_of_element_located((By.ID, "token"))).send_keys(token)
        browser.find_element(By.ID, "login").click()
        try:
            wait.until(ec.presence_of_element_located((By.CLASS_NAME, "task-link"))).click()
        except Exception:
            raise AssertionError(browser.current_url + browser.page_source[:3000]) from None
        try:
            wait.until(ec.presence_of_element_located((By.ID, "prompt")))
        except Exception:
            raise AssertionError(browser.current_url + browser.page_source[:3000]) from None
        assert browser.find_element(By.ID, "prompt").text == "prompt <b>0</b>"  # shown as text, not markup
        loaded = wait.until(
            lambda d: d.execute_script(
                "const imgs = [...document.images];"
                "return imgs.length == 2 && imgs.every(i => i.complete && i.naturalWidth > 0);"
            )
        )
        assert loaded
        browser.find_element(By.TAG_NAME, "body").send_keys("2")  # app.js: "2" chooses the second option
        wait.until(ec.presence_of_element_located((By.ID, "saved")))
        with db.session() as s:
            assert s.scalar(select(func.count(Judgement.id))) == 1
        browser.find_element(By.ID, "choice-tie").click()
        wait.until(ec.presence_of_element_located((By.ID, "done")))
        with db.session() as s:
            answers = [j.answer for j in s.scalars(select(Judgement).order_by(Judgement.id))]
        assert answers[1] == {"choice": "tie"} and answers[0]["choice"] in (0, 1)
    finally:
        server.stop()


def test_arena_vote_reveal_and_leaderboard(tmp_path, browser):
    """An arena battle in the browser: blind (no generator name in the page), a keyboard vote, the generators
    revealed, a second battle tied by click, then the live leaderboard (a screenshot of it is checked)."""
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from mmalign.annotate.tasks import add_arena_task
    from tests.annotate.test_arena import GENERATORS, generator_folders

    db = init_database(tmp_path / "a.db")[0]
    token = add_user(db, "alice")
    add_arena_task(db, "duel", generator_folders(tmp_path, prompts=2), judgements=1)
    server = Server(Path(db.url[len("sqlite:///") :]), tmp_path / "server.log")
    try:
        wait = WebDriverWait(browser, 20)
        browser.get(server.url + "/login")
        wait.until(ec.presence_of_element_located((By.ID, "token"))).send_keys(token)
        browser.find_element(By.ID, "login").click()
        wait.until(ec.presence_of_element_located((By.CLASS_NAME, "task-link"))).click()
        wait.until(ec.presence_of_element_located((By.ID, "prompt")))
        assert not any(name in browser.page_source for name in GENERATORS)
        assert wait.until(
            lambda d: d.execute_script(
                "const imgs = [...document.images];"
                "return imgs.length == 2 && imgs.every(i => i.complete && i.naturalWidth > 0);"
            )
        )
        browser.find_element(By.TAG_NAME, "body").send_keys("1")  # app.js: "1" votes for the first shown
        wait.until(ec.presence_of_element_located((By.ID, "saved")))
        revealed = [browser.find_element(By.ID, f"model-{i}").text for i in range(2)]
        assert set(revealed) <= set(GENERATORS) and len(set(revealed)) == 2
        browser.find_element(By.ID, "next").click()
        wait.until(ec.presence_of_element_located((By.ID, "choice-tie"))).click()
        wait.until(ec.presence_of_element_located((By.ID, "saved")))
        browser.find_element(By.ID, "leaderboard-link").click()
        table = wait.until(ec.presence_of_element_located((By.ID, "leaderboard")))
        rows = table.find_elements(By.CSS_SELECTOR, "td.model")
        assert 2 <= len(rows) <= 3 and {r.text for r in rows} <= set(GENERATORS)
        with db.session() as s:
            answers = [j.answer for j in s.scalars(select(Judgement).order_by(Judgement.id))]
        assert len(answers) == 2 and answers[1] == {"choice": "tie"}
        browser.set_window_size(1000, 700)
        shot = tmp_path / "leaderboard.png"
        assert browser.save_screenshot(str(shot))
        image = Image.open(shot).convert("L")
        assert image.size[0] >= 800 and image.getextrema()[0] < 100  # text drawn on the page, not blank
    finally:
        server.stop()


def test_a_whole_annotation_run_ends_in_a_trained_lora(tmp_path, browser):
    """The issue's whole run in the browser: log in, judge pairs of images, a video pair and an audio pair (each
    player on the page), see the progress on the admin page, export the image votes as pairs and train a toyworld
    LoRA on them. A screenshot of every page goes to the test's folder."""
    from PIL import Image
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from mmalign.annotate.export import export
    from mmalign.commands.train import resolve_trainer_config

    db = init_database(tmp_path / "a.db")[0]
    token = add_user(db, "alice", admin=True)
    images = media.manifest_folder(tmp_path / "images", items=2)
    for i in range(2):  # toyworld-sized images, brighter for the first model, for a visible preference
        for j, model in enumerate(("sd15", "sdxl")):
            Image.new("RGB", (32, 32), (220 - 150 * j, 200 - 120 * j, 40)).save(images / model / f"{i}.png")
    add_task(db, "images", "pairwise", images, judgements=1)
    add_task(db, "videos", "pairwise", media.manifest_folder(tmp_path / "videos", items=1, kind="video"), judgements=1)
    add_task(db, "sounds", "pairwise", media.manifest_folder(tmp_path / "sounds", items=1, kind="audio"), judgements=1)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    server = Server(Path(db.url[len("sqlite:///") :]), tmp_path / "server.log")
    try:
        wait = WebDriverWait(browser, 20)
        browser.set_window_size(1000, 800)
        browser.get(server.url + "/login")
        wait.until(ec.presence_of_element_located((By.ID, "token"))).send_keys(token)
        browser.save_screenshot(str(shots / "login.png"))
        browser.find_element(By.ID, "login").click()
        index = wait.until(ec.presence_of_element_located((By.TAG_NAME, "table"))).text
        assert "images pairwise image 2" in index and "built-in" not in index, index  # item counts, not dict.items
        players = {"images": "img", "videos": "video", "sounds": "audio"}
        for name, tag in players.items():
            wait.until(ec.presence_of_element_located((By.CLASS_NAME, "task-link")))
            browser.find_element(By.LINK_TEXT, name).click()
            while True:
                wait.until(lambda d: d.find_elements(By.ID, "prompt") or d.find_elements(By.ID, "done"))
                if browser.find_elements(By.ID, "done"):
                    break
                assert len(browser.find_elements(By.TAG_NAME, tag)) == 2, browser.page_source[:2000]
                if tag == "audio":  # app.js draws each clip's waveform under its player
                    drawn = wait.until(
                        lambda d: d.execute_script(
                            "const c = [...document.querySelectorAll('canvas.waveform')];"
                            "return c.length == 2 && c.every(x => x.dataset.drawn) && c.map(x => x.dataset.drawn);"
                        )
                    )
                    assert drawn == ["1", "1"]
                    inked = "const x = document.querySelector('canvas.waveform').getContext('2d');"
                    inked += "return x.getImageData(0, 0, 400, 60).data.some((v, i) => i % 4 == 3 && v > 0);"
                    assert browser.execute_script(inked)  # something was drawn
                browser.save_screenshot(str(shots / f"{name}.png"))
                browser.execute_script("window.voted = true;")  # gone once the answer page replaces this one
                browser.find_element(By.TAG_NAME, "body").send_keys("1")  # the first option
                # the next item or the done page; while the page changes, chromium can answer with inspector errors
                WebDriverWait(browser, 20, ignored_exceptions=(WebDriverException,)).until(
                    lambda d: d.execute_script(REPLACED)
                )
            browser.get(server.url + "/")
        browser.get(server.url + "/admin")
        progress = wait.until(ec.presence_of_element_located((By.TAG_NAME, "main"))).text
        browser.save_screenshot(str(shots / "admin.png"))
        assert progress.count("items complete") == 3 and "2 of 2 items complete" in progress, progress
        with db.session() as s:
            assert s.scalar(select(func.count(Judgement.id))) == 4
    finally:
        server.stop()
    assert all(Image.open(shot).getextrema() for shot in shots.iterdir()) and len(list(shots.iterdir())) >= 5

    pairs = tmp_path / "pairs.jsonl"
    assert export(db, "images", "pairs", pairs) == 2
    toy = Path(__file__).resolve().parents[2] / "assets" / "toyworld" / "pipeline"
    args = [f"model={toy}", f"data={pairs}", f"output_dir={tmp_path / 'lora'}", "resolution=32", "batch_size=2"]
    args += ["max_steps=2", "lora_rank=4", "lr=1e-3", "tracker=none", "progress=false", "log_every=1"]
    cls, config = resolve_trainer_config(None, args)
    summary = cls(config).train()
    assert summary["steps"] == 2 and summary["pairs"] == 2
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
