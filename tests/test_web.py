"""The web demo: `odlora serve`'s page in headless Chromium, and its /odlora routes over HTTP.

    python -m pytest -q tests/test_web.py      # a tiny ONNX export; the browser test needs Debian's
                                               # chromium + chromium-driver (apt-get install -y chromium chromium-driver)

The browser drives the page as a user would: two columns answer one message with adapters a and b,
a column switches adapter for its next message, and a personalisation from a local file runs to its
end and adds a model. The oracle is `Runtime.generate` on the same runtime: the page must show exactly
what it returns. Screenshots land in the test's tmp_path and in test-output/web/ (not in git).
Without Chromium the browser test skips, or fails saying how to install it when ODLORA_REQUIRE_BROWSER=1 (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from conftest import training_text  # noqa: E402
from ondevice_lora.config import SamplingConfig  # noqa: E402
from ondevice_lora.runtime.access import Access  # noqa: E402
from ondevice_lora.runtime.server import build_server  # noqa: E402
from ondevice_lora.web.app import WebApp  # noqa: E402
from test_serve import MESSAGES, open_runtime, tiny_export  # noqa: E402,F401 (tiny_export is a fixture)

OUTPUT = Path(__file__).resolve().parent.parent / "test-output" / "web"
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000"]
INSTALL = ("headless Chromium is missing ({}): install it with `apt-get install -y chromium chromium-driver` "
           "(Debian/Ubuntu) and `pip install -e '.[test]'`")
TOKENS = 8
FOLLOW_UP = "What is the capital?"
JOB_TIMEOUT = 180  # seconds: a tiny job takes a few, but the CPUs may be shared


# -- a served runtime with the web app ----------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tiny_export, tmp_path_factory):
    """(runtime, page URL) of a server with the web app on a free loopback port, adapters a and b."""
    rt = open_runtime(tiny_export)
    server = build_server(rt, "127.0.0.1", 0, webapp=WebApp(rt, tmp_path_factory.mktemp("web-work")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield rt, server.root
    finally:
        server.shutdown()
        server.server_close()


def request(url: str, body=None, headers=None) -> tuple[int, Message, bytes]:
    """(status, headers (names in any case), body) of a GET, or of a POST of a dict as JSON."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})} if body is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def post_job(root: str, body: dict, **headers) -> tuple[int, dict]:
    status, _, data = request(root + "/odlora/jobs", body, headers)
    return status, json.loads(data)


def wait_job(root: str, job_id: str) -> dict:
    deadline = time.time() + JOB_TIMEOUT
    while time.time() < deadline:
        job = json.loads(request(f"{root}/odlora/jobs/{job_id}")[2])
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['state']} after {JOB_TIMEOUT} s")


def answer(rt, messages, adapter) -> str:
    return rt.generate(messages, adapter=adapter, sampling=SamplingConfig(max_new_tokens=TOKENS)).text


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """A small local chat-style data set: 30 prompt/completion lines."""
    lines = training_text(60)
    path = tmp_path_factory.mktemp("web-data") / "notes.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in zip(lines[::2], lines[1::2])))
    return path


# -- the page and the routes, over HTTP -----------------------------------------------------------------

def test_page_files_are_served_and_nothing_else(served):
    _, root = served
    status, headers, body = request(root + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b'src="/app/app.js"' in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]  # the page may fetch nothing from elsewhere
    assert request(root + "/app/app.js")[1]["Content-Type"].startswith("text/javascript")
    assert request(root + "/app/style.css")[1]["Content-Type"].startswith("text/css")
    for path in ("/app/__init__.py", "/app/../app.py", "/app/%2e%2e/app.py", "/app/app.py", "/app/nope.js", "/index.html"):
        assert request(root + path)[0] == 404, path


def test_state_lists_the_export_and_adapters(served):
    _, root = served
    state = json.loads(request(root + "/odlora/state")[2])
    assert state["export"]["target"] == "onnx" and state["export"]["max_rank"] == 8
    assert [a["id"] for a in state["adapters"]][:2] == ["a", "b"]
    assert all(a["size"] > 0 and a["rank"] for a in state["adapters"])
    assert state["samples"] == ["dates", "contacts"]


BAD_JOBS = {
    # name -> (body, status, param)
    "no name": ({"sample": "dates"}, 400, "name"),
    "a name that is a path": ({"name": "../x", "sample": "dates"}, 400, "name"),
    "the base's name": ({"name": "base", "sample": "dates"}, 400, "name"),
    "an adapter's name": ({"name": "a", "sample": "dates"}, 409, "name"),
    "zero steps": ({"name": "x", "sample": "dates", "steps": 0}, 400, "steps"),
    "a rank over the slots": ({"name": "x", "sample": "dates", "rank": 9}, 400, "rank"),
    "steps as text": ({"name": "x", "sample": "dates", "steps": "5"}, 400, "steps"),
    "no data": ({"name": "x"}, 400, "path"),
    "two data sources": ({"name": "x", "sample": "dates", "path": "/etc/hostname"}, 400, "path"),
    "an unknown sample": ({"name": "x", "sample": "poems"}, 400, "sample"),
    "a directory": ({"name": "x", "path": "/tmp"}, 400, "path"),
    "a missing file": ({"name": "x", "path": "/nonexistent/data.jsonl"}, 400, "path"),
    "not a data file": ({"name": "x", "path": "/etc/passwd"}, 400, "path"),
    "a device": ({"name": "x", "path": "/dev/null"}, 400, "path"),
    "an empty upload": ({"name": "x", "upload": {"filename": "a.jsonl", "text": " "}}, 400, "upload"),
    "an upload of a script": ({"name": "x", "upload": {"filename": "a.sh", "text": "rm -rf /"}}, 400, "upload"),
}


@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_a_bad_job_request_is_refused_with_a_json_error(served, case):
    body, status, param = BAD_JOBS[case]
    got, error = post_job(served[1], body)
    assert got == status and error["error"]["param"] == param, error


def test_a_job_request_from_another_site_is_refused(served):
    root, body = served[1], {"name": "x", "sample": "dates"}
    assert post_job(root, body, Origin="https://example.com")[0] == 403
    assert post_job(root, body, **{"Content-Type": "text/plain"})[0] == 415  # what a form may send unasked
    assert post_job(root, body, Host="evil.example:8000")[0] == 403  # DNS rebinding onto loopback


def test_a_job_on_a_shipped_sample_is_served_and_scored(served):
    rt, root = served
    status, job = post_job(root, {"name": "dates-1", "sample": "dates", "steps": 2, "rank": 4, "eval_examples": 2})
    assert status == 202 and job["state"] == "training" and job["total"] == 2 and job["task"] == "dates"
    status, error = post_job(root, {"name": "other", "sample": "dates"})
    assert status == 409 and error["error"]["code"] == "job_running"  # one job at a time
    job = wait_job(root, job["id"])
    assert job["state"] == "done", job["error"]
    assert [s for s, _ in job["loss"]] == [1, 2] and [s for s, _ in job["val"]] == [0, 2]  # before, and at the end
    adapter = job["adapter"]
    assert adapter["id"] == "dates-1" and adapter["rank"] == 4 and adapter["size"] > 0
    assert adapter["val_loss"] == job["val"][-1][1]
    assert adapter["exact_match"]["task"] == "dates" and adapter["exact_match"]["examples"] == 2
    status, _, body = request(root + "/v1/chat/completions",
                              {"model": "dates-1", "messages": MESSAGES, "max_tokens": TOKENS})
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == answer(rt, MESSAGES, "dates-1")


def test_a_job_on_an_uploaded_file(served, data_file):
    root = served[1]
    upload = {"filename": "notes.jsonl", "text": data_file.read_text()}
    status, job = post_job(root, {"name": "uploaded", "upload": upload, "steps": 1, "rank": 2})
    assert status == 202 and job["task"] is None
    job = wait_job(root, job["id"])
    assert job["state"] == "done" and job["adapter"]["exact_match"] is None, job["error"]
    assert Path(job["data"]).read_text() == upload["text"]


def test_a_job_that_fails_says_why(served, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    status, job = post_job(served[1], {"name": "bad", "path": str(bad), "steps": 1})
    assert status == 202
    job = wait_job(served[1], job["id"])
    assert job["state"] == "failed" and "bad.jsonl" in job["error"]


def test_a_job_can_be_cancelled_and_its_name_used_again(served):
    rt, root = served
    status, job = post_job(root, {"name": "long", "sample": "dates", "steps": 2000, "rank": 2, "eval_examples": 0})
    assert status == 202
    status, _, _ = request(f"{root}/odlora/jobs/{job['id']}/cancel", {})
    assert status == 202
    job = wait_job(root, job["id"])
    assert job["state"] == "cancelled" and job["step"] < 2000 and "long" not in rt.adapters
    status, again = post_job(root, {"name": "long", "sample": "dates", "steps": 1, "rank": 2, "eval_examples": 0})
    assert status == 202 and wait_job(root, again["id"])["state"] == "done"


def delete(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_deleting_an_adapter_removes_only_what_the_page_made(tiny_export, tmp_path):
    from ondevice_lora.atomic import sidecar_of

    export_dir, blobs = tiny_export
    given = tmp_path / "given.onnx_adapter"  # an adapter the user gave `serve`: never deleted
    for source, target in ((blobs["a"], given), (sidecar_of(blobs["a"]), sidecar_of(given))):
        shutil.copy(source, target)
    work = tmp_path / "work"
    (work / "packed").mkdir(parents=True)
    made = work / "packed" / "made.onnx_adapter"  # as a job of the page leaves it
    for source, target in ((blobs["b"], made), (sidecar_of(blobs["b"]), sidecar_of(made))):
        shutil.copy(source, target)
    rt = open_runtime(tiny_export)
    rt.register_adapter("given", given)
    server = build_server(rt, "127.0.0.1", 0, webapp=WebApp(rt, work))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert delete(server.root + "/odlora/adapters/made") == (200, {"id": "made", "removed": [str(made)]})
        assert delete(server.root + "/odlora/adapters/given") == (200, {"id": "given", "removed": []})
        assert delete(server.root + "/odlora/adapters/given")[0] == 404
        assert sorted(rt.adapters) == ["a", "b"] and given.is_file() and not made.exists()
        assert not sidecar_of(made).exists() and sidecar_of(given).is_file()
    finally:
        server.shutdown()
        server.server_close()


# -- the page in headless Chromium -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Debian's chromium driven through its chromedriver (Selenium never downloads a browser here)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    missing = [name for name, found in (("chromium", chromium), ("chromedriver", chromedriver),
                                        ("selenium", webdriver)) if not found]
    if missing:
        if os.environ.get("ODLORA_REQUIRE_BROWSER") == "1":
            pytest.fail(INSTALL.format(", ".join(missing)) + " (ODLORA_REQUIRE_BROWSER=1)", pytrace=False)
        pytest.skip(INSTALL.format(", ".join(missing)))
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*BROWSER_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    yield driver
    driver.quit()


class Page:
    """The demo page as the test sees it."""

    def __init__(self, driver, shots: Path):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.shots, self.by = driver, shots, By
        self.wait = lambda condition, timeout=60: WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)

    def find(self, css: str, root=None):
        return (root or self.driver).find_element(self.by.CSS_SELECTOR, css)

    def find_all(self, css: str, root=None):
        return (root or self.driver).find_elements(self.by.CSS_SELECTOR, css)

    def pick(self, select, value: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(select).select_by_value(value)

    def type(self, css: str, text: str) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(text)

    def text(self, element) -> str:
        """Exactly what the element holds (Selenium's .text would fold its whitespace)."""
        return self.driver.execute_script("return arguments[0].textContent", element)

    def send(self, message: str, answers: int) -> list[list[tuple[str, str]]]:
        """Send to every column; once `answers` answers are done, each column's (model, text) pairs."""
        self.type("#message", message)
        self.find("#send").click()
        self.wait(lambda d: len(self.find_all('.msg.assistant:not([data-state="streaming"])')) == answers)
        assert not self.find_all('.msg.assistant[data-state="error"]')
        return [[(m.get_attribute("data-model"), self.text(self.find(".text", m)))
                 for m in self.find_all(".msg.assistant", column)] for column in self.find_all(".column")]

    def screenshot(self, name: str) -> None:
        path = self.shots / name
        self.driver.save_screenshot(str(path))
        OUTPUT.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, OUTPUT / name)


def test_browser_chats_with_two_adapters_and_personalises(browser, served, data_file, tmp_path):
    rt, root = served
    page = Page(browser, tmp_path)
    browser.get(root + "/")
    page.wait(lambda d: d.execute_script("return document.body.dataset.ready") == "true")
    columns = page.find_all(".column")
    assert len(columns) == 2
    page.pick(page.find("select.model", columns[0]), "a")
    page.pick(page.find("select.model", columns[1]), "b")
    page.type("#max-tokens", str(TOKENS))

    # one message, answered side by side by two adapters
    text = MESSAGES[0]["content"]
    want = {name: answer(rt, MESSAGES, name) for name in ("a", "b")}
    assert want["a"] != want["b"], "the two adapters must answer differently"
    assert page.send(text, answers=2) == [[("a", want["a"])], [("b", want["b"])]]
    assert all("tokens/s" in page.text(stats) for stats in page.find_all(".msg.assistant .stats"))

    # the next message in the first column goes to another adapter, in the same conversation
    page.pick(page.find("select.model", columns[0]), "b")
    follow = {name: [*MESSAGES, {"role": "assistant", "content": want[name]}, {"role": "user", "content": FOLLOW_UP}]
              for name in ("a", "b")}
    got = page.send(FOLLOW_UP, answers=4)
    assert got == [[("a", want["a"]), ("b", answer(rt, follow["a"], "b"))],
                   [("b", want["b"]), ("b", answer(rt, follow["b"], "b"))]]
    page.screenshot("chat.png")

    # a personalisation from a local file: progress to the end, then a new model with its size and metric
    page.type("#job-name", "mine")
    page.pick(page.find("#job-source"), "path")
    page.type("#job-path", str(data_file))
    page.type("#job-steps", "4")
    page.type("#job-rank", "4")
    page.find("#job-start").click()
    page.wait(lambda d: page.find("#job-state").get_attribute("data-state") in ("done", "failed"), JOB_TIMEOUT)
    assert page.find("#job-state").get_attribute("data-state") == "done", page.text(page.find("#job-result"))
    progress = page.find("#job-progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") == "4"
    assert len(page.find_all("#loss-chart polyline.train")) == 1 and page.find_all("#loss-chart circle.val-point")
    page.wait(lambda d: page.find_all('tr[data-adapter="mine"]'))
    row = {cell.get_attribute("data-field"): cell.text for cell in page.find_all('tr[data-adapter="mine"] td')}
    assert row["rank"] == "4" and row["size"].endswith("kB") and "→" in row["val"], row
    assert "mine is served" in page.find("#job-result").text
    assert [page.text(t) for t in page.find_all("#loss-chart text.title")] == ["step", "loss"]
    assert len(page.find_all("#loss-chart text.tick")) == 6
    page.screenshot("personalise.png")

    # the new adapter answers in a column like any other, in a fresh conversation
    for column in columns:
        page.find(".clear", column).click()
    page.pick(page.find("select.model", columns[1]), "mine")
    assert page.send(text, answers=2) == [[("b", want["b"])], [("mine", answer(rt, MESSAGES, "mine"))]]

    # the page at a phone's width and a wide screen: nothing wider than the window
    for width in (400, 1280):
        browser.set_window_size(width, 900)
        page.wait(lambda d: d.execute_script("return window.innerWidth") <= width)
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"), width
        page.screenshot(f"page-{width}px.png")
    browser.set_window_size(1400, 1000)

    # deleting the page's adapter: asked first, then gone from the table and the models
    page.find('tr[data-adapter="mine"] button.delete').click()
    browser.switch_to.alert.accept()
    page.wait(lambda d: not page.find_all('tr[data-adapter="mine"]'))
    assert "mine" not in rt.adapters


def test_answers_render_code_fences_as_code_and_markup_as_text(browser, served):
    page = Page(browser, Path("."))
    browser.get(served[1] + "/")
    page.wait(lambda d: d.execute_script("return document.body.dataset.ready") == "true")
    rendered = browser.execute_script("""
        const node = document.createElement("div");
        renderAnswer(node, 'Run:\\n```python\\nprint(1)\\n```\\n<img src=x onerror="window.hit=1">');
        return [node.querySelectorAll("pre.code code").length, node.querySelector("code").textContent,
                node.querySelectorAll("img").length, node.textContent];""")
    assert rendered[:3] == [1, "print(1)\n", 0] and rendered[3].endswith('<img src=x onerror="window.hit=1">')


def test_browser_gets_in_with_the_api_key_once(browser, tiny_export, tmp_path):
    """With --api-key, the page opened once as /?key=KEY works as without one, and the key leaves the address bar."""
    rt = open_runtime(tiny_export)
    server = build_server(rt, "127.0.0.1", 0, webapp=WebApp(rt, tmp_path / "work"),
                          access=Access.build("127.0.0.1", api_key="page-key-1"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = Page(browser, tmp_path)
        browser.get(server.root + "/")
        assert "invalid_api_key" in browser.page_source  # no key, no page
        browser.get(server.root + "/?key=page-key-1")
        page.wait(lambda d: d.execute_script("return document.body.dataset.ready") == "true")
        assert browser.current_url == server.root + "/"
        page.type("#max-tokens", str(TOKENS))
        got = page.send(MESSAGES[0]["content"], answers=2)
        assert got == [[("base", answer(rt, MESSAGES, None))], [("a", answer(rt, MESSAGES, "a"))]]
    finally:
        server.shutdown()
        server.server_close()
