"""The web page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

Screenshots are saved under pytest's tmp dir; their paths are printed (run with -s to see them).
"""

from __future__ import annotations

import os
import re
import shutil
import time

import httpx
import pytest
import redis

from jobqueue.protocol import ErrorCode, JobError, JobStatus
from jobqueue.store import JobStore
from tests.api.conftest import start_gateway

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium floods this closed network with connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SENTIMENT_LINE = re.compile(r"^(😄 LLM 情感判断: 正面|😞 LLM 情感判断: 负面)（置信度 [01]\.\d\d）$")

# Records, per turn, the order in which its parts first get text.
RECORD_ORDER = """
window.__firstShown = [];
new MutationObserver((mutations) => {
  for (const m of mutations) {
    const el = m.target.nodeType === 1 ? m.target : m.target.parentElement;
    const turn = el && el.closest(".turn");
    if (!turn || !el.className || !el.textContent) continue;
    const entry = [...turn.parentElement.children].indexOf(turn) + ":" + el.className;
    if (!window.__firstShown.includes(entry)) window.__firstShown.push(entry);
  }
}).observe(document.body, { subtree: true, childList: true, characterData: true });
"""


@pytest.fixture(scope="module")
def browser():
    if shutil.which(CHROMIUM) is None:
        message = f"{CHROMIUM} is missing: install Debian's chromium package (.ci/run does)"
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 900, "height": 900})
    page = context.new_page()
    yield page
    context.close()


def ask(page, text: str) -> None:
    page.fill("#text", text)
    page.click("#send")


def test_page_shows_the_sentiment_then_the_reply_in_one_conversation(page, gateway, tmp_path):
    from playwright.sync_api import expect

    page.goto(gateway.url)
    page.evaluate(RECORD_ORDER)
    turns = page.locator(".turn")
    text = "送餐太慢了，等了两个小时，菜都凉了"
    for n in (1, 2):  # the same text twice: the second turn has the first as history
        ask(page, text)
        turn = turns.nth(n - 1)
        expect(turn.locator(".sentiment")).to_have_text(SENTIMENT_LINE, timeout=60_000)
        expect(turn.locator(".reply")).to_have_text(re.compile(r"^🤖 \S"), timeout=60_000)
        expect(page.locator("#send")).to_be_enabled(timeout=60_000)
        expect(turn.locator(".problem")).to_be_empty()
        expect(turn.locator(".state")).to_be_empty()
    shot = tmp_path / "page-conversation.png"
    page.screenshot(path=shot, full_page=True)
    print(f"\nscreenshot of the conversation: {shot}")

    shown = page.evaluate("window.__firstShown")
    for n in (0, 1):
        assert shown.index(f"{n}:sentiment") < shown.index(f"{n}:reply"), shown
    first, second = (httpx.get(f"{gateway.url}/v1/jobs/{turns.nth(i).get_attribute('data-job-id')}").json()
                     for i in (0, 1))
    assert first["status"] == second["status"] == "succeeded"
    assert first["request"]["conversation_id"] == second["request"]["conversation_id"] is not None
    assert second["tokens"]["reply_prompt_tokens"] > first["tokens"]["reply_prompt_tokens"]


@pytest.fixture(scope="module")
def stalled_gateway(lonely_redis, tmp_path_factory):
    """A gateway whose queue no worker serves: at most 2 waiting jobs, streams give up after 2 s, a key."""
    env = {"REDIS_URL": lonely_redis.url, "MAX_QUEUE": "2", "EVENTS_TIMEOUT_S": "2", "API_KEY": "page-key-0123456789"}
    gateway = start_gateway(env, tmp_path_factory.mktemp("logs") / "stalled-gateway.log")
    yield gateway
    gateway.stop()


def test_page_explains_key_failure_timeout_and_a_full_queue(page, stalled_gateway, lonely_redis, tmp_path):
    from playwright.sync_api import expect

    page.goto(stalled_gateway.url)
    turns = page.locator(".turn")

    ask(page, "没有钥匙")
    expect(turns.nth(0).locator(".problem")).to_contain_text("🔑 需要正确的 API key")
    page.click("summary")
    page.fill("#api-key", "page-key-0123456789")

    ask(page, "第一条")
    expect(turns.nth(1).locator(".state")).to_have_text("⏳ 排队中：第 1 位（1st in line）")  # no rate yet: no ETA
    finish_as_a_worker_would(lonely_redis, turns.nth(1), JobStatus.FAILED, ErrorCode.MODEL_ERROR,
                             "RuntimeError: out of memory")
    expect(turns.nth(1).locator(".problem")).to_have_text("❌ 任务失败：RuntimeError: out of memory")

    ask(page, "第二条")  # waits behind the first message, which no worker takes
    # Behind the first job's message; one job finished in the last 300 s: about 600 s.
    expect(turns.nth(2).locator(".state")).to_have_text("⏳ 排队中：第 2 位，约 600 秒（2nd in line）")
    expect(turns.nth(2).locator(".problem")).to_contain_text("⌛ 等了 2 秒，任务仍在排队", timeout=10_000)

    ask(page, "第三条")
    expect(turns.nth(3).locator(".problem")).to_have_text("🚦 队列已满，请 5 秒后再试。(queue full: retry in 5 s)")
    shot = tmp_path / "page-problems.png"
    page.screenshot(path=shot, full_page=True)
    print(f"\nscreenshot of the problem messages: {shot}")


def finish_as_a_worker_would(server, turn, status: JobStatus, code: ErrorCode, message: str) -> None:
    """Write the turn's job a final record, as a worker (or the hard time limit's handler) does."""
    with redis.Redis.from_url(server.url) as client:
        store = JobStore(client, ttl_s=60)
        record = store.get(turn.get_attribute("data-job-id"))
        record.status, record.finished_at = status, time.time()
        if status is not JobStatus.EXPIRED:  # it ran: it counts towards the service rate (the ETA)
            record.started_at = record.finished_at
        record.error = JobError(code=code, message=message)
        store.put(record)


def test_page_explains_a_timeout_and_an_expiry(page, stalled_gateway, lonely_redis):
    from playwright.sync_api import expect

    with redis.Redis.from_url(lonely_redis.url) as client:
        client.flushdb()  # the previous test left the queue full
    page.goto(stalled_gateway.url)
    page.click("summary")
    page.fill("#api-key", "page-key-0123456789")
    turns = page.locator(".turn")
    cases = [(JobStatus.TIMED_OUT, ErrorCode.TIMED_OUT, "⌛ 任务运行超时，已被终止。(timed out)"),
             (JobStatus.EXPIRED, ErrorCode.EXPIRED, "⌛ 排队时间过长，任务已过期，没有运行。(expired in the queue)")]
    for n, (status, code, shown) in enumerate(cases):
        ask(page, f"第{n + 1}条")
        expect(turns.nth(n).locator(".state")).to_contain_text("⏳ 排队中")
        finish_as_a_worker_would(lonely_redis, turns.nth(n), status, code, status.value)
        expect(turns.nth(n).locator(".problem")).to_have_text(shown)
        expect(turns.nth(n).locator(".state")).to_be_empty()


def test_the_stop_button_cancels_a_waiting_job(page, stalled_gateway, lonely_redis):
    from playwright.sync_api import expect

    with redis.Redis.from_url(lonely_redis.url) as client:
        client.flushdb()
    page.goto(stalled_gateway.url)
    page.click("summary")
    page.fill("#api-key", "page-key-0123456789")
    turn = page.locator(".turn").nth(0)
    ask(page, "不想等了")
    expect(turn.locator(".state")).to_contain_text("⏳ 排队中")
    turn.locator(".stop").click()
    expect(turn.locator(".problem")).to_have_text("⏹ 已取消。(cancelled)")
    expect(turn.locator(".stop")).to_be_hidden()
    with redis.Redis.from_url(lonely_redis.url) as client:
        assert JobStore(client, ttl_s=60).get(turn.get_attribute("data-job-id")).status is JobStatus.CANCELLED
