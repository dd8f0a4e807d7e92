"""The web demo under load and hostile use: many sessions at once, sessions that stop or vanish
mid-answer, a generation that fails, uploads over the size limit.

One server for the module, in this process so that a test can make the model fail: the real
``launch()`` of the web app, on a free port of 127.0.0.1, over the tiny built checkpoint. Its
``model.generate`` is wrapped to record every run and to fail mid-answer for prompts holding
``FAIL_MARKER``. Sessions talk to it through gradio_client (one client, one session), and once
through a raw HTTP stream that is cut off, as a closed browser tab would. Every wait is bounded,
and the module refuses any connection that leaves this machine.
"""

from __future__ import annotations

import http.client
import importlib.util
import ipaddress
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytest.importorskip("gradio", reason="the web demo needs gradio (pip install -e '.[gradio]')")
pytest.importorskip("gradio_client", reason="these tests talk to the server through gradio_client")

from gradio_client import Client, handle_file  # noqa: E402

from deepseek_vl2.chat import DeepseekVL2Chat, GenerationSettings  # noqa: E402
from deepseek_vl2.grounding import clean_answer  # noqa: E402
from deepseek_vl2.web.app import MAX_UPLOAD_MB, ChatApp, launch  # noqa: E402

pytestmark = pytest.mark.filterwarnings(  # Gradio's in-process queue statistics, on pandas 3
    "ignore:'future.no_silent_downcasting' is deprecated", "ignore:The copy keyword is deprecated"
)

IMAGES = Path(__file__).resolve().parents[1] / "images"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

FAIL_MARKER = "EXPLODE"  # a prompt holding it fails after a few generated tokens
INJECTED_ERROR = "CUDA out of memory (injected by the test)"
SHORT = 12  # new tokens of an ordinary answer
LONG = 4000  # new tokens asked of an answer that is then cut short (greedy: this random model never ends early)
ANSWER_WITHIN_S = 90.0  # any single request, including its wait in the queue (2 busy cores)
FREED_WITHIN_S = 5.0  # from Stop or disconnect until the model's generation has ended
NEXT_WITHIN_S = 15.0  # from Stop or disconnect until a new session has its whole answer


# -- no traffic leaves this machine -----------------------------------------------------------------


def _is_loopback(sock: socket.socket, address) -> bool:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return True  # unix sockets and the like
    host = address[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture(scope="module", autouse=True)
def loopback_only():
    """Refuse, and report, any connection from this process (server or clients) to another machine."""
    refused = []
    originals = {name: getattr(socket.socket, name) for name in ("connect", "connect_ex")}

    def guard(original):
        def connect(sock, address):
            if not _is_loopback(sock, address):
                refused.append(address)
                raise ConnectionRefusedError(f"this test module reaches only 127.0.0.1, not {address}")
            return original(sock, address)

        return connect

    for name, original in originals.items():
        setattr(socket.socket, name, guard(original))
    yield
    for name, original in originals.items():
        setattr(socket.socket, name, original)
    assert not refused, f"something tried to reach other machines: {refused}"


# -- the server ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """One call of model.generate: its prompt, when it ran, how many tokens it made."""

    prompt: str
    started: float
    ended: float | None = None
    new_tokens: int | None = None


class _FailAfter:
    """A streamer wrapper that raises inside generate() once ``tokens`` new tokens were streamed."""

    def __init__(self, streamer, tokens: int):
        self.streamer, self.puts_left = streamer, tokens + 1  # generate() puts the prompt first

    def put(self, value):
        if self.puts_left == 0:
            raise RuntimeError(INJECTED_ERROR)
        self.puts_left -= 1
        self.streamer.put(value)

    def end(self):
        self.streamer.end()


class ObservedApp(ChatApp):
    """The real app; it also counts the answers being generated at the same moment."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._count_lock = threading.Lock()
        self.answering = self.most_answering = 0

    def respond(self, *args):
        with self._count_lock:
            self.answering += 1
            self.most_answering = max(self.most_answering, self.answering)
        try:
            yield from super().respond(*args)
        finally:
            with self._count_lock:
                self.answering -= 1


@dataclass
class Server:
    url: str
    port: int
    chat: DeepseekVL2Chat
    app: ObservedApp
    runs: list[Run] = field(default_factory=list)

    def run_for(self, marker: str) -> Run:
        (run,) = [run for run in self.runs if marker in run.prompt]
        return run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint_dir, tmp_path_factory):
    chat, port = DeepseekVL2Chat.from_pretrained(checkpoint_dir("tiny"), dtype="float32"), free_port()
    app = ObservedApp(chat, model_name="tiny (random weights)")
    served = Server(url=f"http://127.0.0.1:{port}/", port=port, chat=chat, app=app)
    generate, tokenizer = chat.model.generate, chat.processor.tokenizer

    def recorded_generate(*args, **kwargs):
        run = Run(prompt=tokenizer.decode(kwargs["input_ids"][0]), started=time.monotonic())
        served.runs.append(run)
        if FAIL_MARKER in run.prompt:
            kwargs["streamer"] = _FailAfter(kwargs["streamer"], tokens=3)
        try:
            sequences = generate(*args, **kwargs)
            run.new_tokens = sequences.shape[1] - kwargs["input_ids"].shape[1]
            return sequences
        finally:
            run.ended = time.monotonic()

    chat.model.generate = recorded_generate
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))  # uploads land here
        demo = launch(app, port=port, block=False)
        try:
            yield served
        finally:
            demo.close()


# -- sessions -------------------------------------------------------------------------------------


def greedy(max_new_tokens: int) -> tuple:
    """The /respond inputs after the session state: top_p, temperature 0, repetition penalty, lengths."""
    return 0.9, 0.0, 1.1, max_new_tokens, 4096


def send(client: Client, text: str, files=()) -> list[dict]:
    message = {"text": text, "files": [handle_file(str(path)) for path in files]}
    shown, *_ = client.submit(message, api_name="/add_message").result(timeout=ANSWER_WITHIN_S)
    return shown


def answer(client: Client, max_new_tokens: int = SHORT) -> tuple:
    """Wait for the session's last message to be answered: (chat, gallery, status), as shown at the end."""
    return client.submit(*greedy(max_new_tokens), api_name="/respond").result(timeout=ANSWER_WITHIN_S)


def converse(client: Client, text: str, files=(), *, ready: threading.Barrier | None = None) -> tuple:
    """Send one message in this session and get the whole answer; with ``ready``, all sessions ask at once."""
    try:
        send(client, text, files)
    except BaseException:
        if ready is not None:
            ready.abort()  # the others need not wait for this one
        raise
    if ready is not None:
        ready.wait()
    return answer(client)


def ask(url: str, text: str, files=(), *, ready: threading.Barrier | None = None) -> tuple:
    """The same, in a new session."""
    client = Client(url, verbose=False, download_files=False)
    try:
        return converse(client, text, files, ready=ready)
    finally:
        client.close()


def at_once(*calls: Callable[[], tuple]) -> list[tuple]:
    """Run the calls in threads, each a session; their results in order."""
    pool = ThreadPoolExecutor(max_workers=len(calls))
    try:
        futures = [pool.submit(call) for call in calls]
        return [future.result(timeout=2 * ANSWER_WITHIN_S) for future in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def expected_answer(chat: DeepseekVL2Chat, text: str, files=(), max_new_tokens: int = SHORT):
    """What the model answers ``text`` alone, greedy, called directly: (shown text, new tokens)."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.1)
    result = chat.chat(text, images=[str(path) for path in files], settings=settings)
    return clean_answer(result.answer), result.new_tokens


def texts(message: dict) -> list[str]:
    return [part["text"] for part in message["content"] if part.get("type") == "text"]


def file_paths(message: dict) -> list[Path]:
    return [Path(part["file"]["path"]) for part in message["content"] if part.get("type") == "file"]


def wait_for_streamed_text(job) -> None:
    """Until the answer has started to stream in (some text shown while still generating)."""
    deadline = time.monotonic() + ANSWER_WITHIN_S
    while time.monotonic() < deadline:
        if outputs := job.outputs():
            shown, _, status = outputs[-1]
            if status.startswith("Generating") and shown[-1]["role"] == "assistant" and texts(shown[-1]):
                return
        assert not job.done(), f"the answer ended before it could be interrupted: {job.outputs()[-1:]}"
        time.sleep(0.02)
    pytest.fail("the answer did not start streaming")


def assert_model_freed(server: Server, marker: str, interrupted_at: float) -> None:
    """The interrupted generation ended soon, long before its token budget, and a new session is answered."""
    run = server.run_for(marker)
    deadline = interrupted_at + FREED_WITHIN_S
    while run.ended is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert run.ended is not None and run.ended - interrupted_at < FREED_WITHIN_S
    assert run.new_tokens < LONG // 4  # it stopped, it did not run to its budget
    chat, _, status = ask(server.url, "A new session, after the interrupted one?")
    assert time.monotonic() - interrupted_at < NEXT_WITHIN_S
    assert "tokens/s" in status and texts(chat[-1]), status


# -- many sessions at once ------------------------------------------------------------------------


def test_eight_concurrent_sessions_each_get_their_own_whole_answer(server):
    """Distinct prompts (half with distinct images) sent at once: each session's chat holds only its
    own turn, and its answer is exactly what the model answers that prompt alone."""
    images = ["street.png", "chart.png", "document.png", "shapes.png"]
    requests = [
        (f"Session {index}: my name is {name}.", [IMAGES / images[index // 2]] if index % 2 else [])
        for index, name in enumerate(["Ann", "Bob", "Cem", "Dan", "Eva", "Fay", "Gus", "Hal"])
    ]
    ready = threading.Barrier(len(requests), timeout=ANSWER_WITHIN_S)
    results = at_once(*[partial(ask, server.url, text, files, ready=ready) for text, files in requests])
    assert server.app.most_answering == 1  # queued: one answer generated at a time, on one model

    shown_answers = []
    for (text, files), (chat, gallery, status) in zip(requests, results):
        user, assistant = chat  # this session's turn, nobody else's
        assert texts(user) == [text]
        assert [path.read_bytes() for path in file_paths(user)] == [path.read_bytes() for path in files]
        assert len(gallery) == len(files)
        expected, new_tokens = expected_answer(server.chat, text, files)
        assert texts(assistant) == [expected]
        assert f"+ {new_tokens} new tokens" in status
        shown_answers.append(expected)
    assert len(set(shown_answers)) == len(requests)  # distinct answers: a mix-up could not go unseen


# -- sessions that stop or vanish mid-answer ------------------------------------------------------


def test_stop_mid_answer_keeps_the_text_and_frees_the_model(server):
    client = Client(server.url, verbose=False, download_files=False)
    try:
        send(client, "Stop me: tell a long story.")
        job = client.submit(*greedy(LONG), api_name="/respond")
        wait_for_streamed_text(job)
        stopped_at = time.monotonic()
        client.submit(api_name="/stop").result(timeout=ANSWER_WITHIN_S)
        chat, _, status = job.result(timeout=FREED_WITHIN_S)
    finally:
        client.close()
    assert status == "Stopped." and texts(chat[-1])  # what came so far stays on the page
    assert_model_freed(server, "Stop me", stopped_at)


def _cancel_job(server: Server, marker: str) -> float:
    """gradio_client's job.cancel() mid-answer; returns when it was cancelled."""
    client = Client(server.url, verbose=False, download_files=False)
    try:
        send(client, f"{marker}: tell a long story.")
        job = client.submit(*greedy(LONG), api_name="/respond")
        wait_for_streamed_text(job)
        cancelled_at = time.monotonic()
        assert job.cancel()
        return cancelled_at
    finally:
        client.close()


def _close_connection(server: Server, marker: str) -> float:
    """The browser tab goes away: the answer's event stream is cut off mid-answer."""
    client = Client(server.url, verbose=False, download_files=False)
    try:
        send(client, f"{marker}: tell a long story.")
        with urllib.request.urlopen(f"{server.url}config", timeout=30) as response:
            respond = {dep.get("api_name"): dep["id"] for dep in json.load(response)["dependencies"]}["respond"]
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=ANSWER_WITHIN_S)
        body = {"data": [None, *greedy(LONG)], "fn_index": respond, "session_hash": client.session_hash,
                "event_data": None, "trigger_id": None}  # fmt: skip
        connection.request("POST", "/gradio_api/queue/join", json.dumps(body), {"Content-Type": "application/json"})
        assert "event_id" in json.loads(connection.getresponse().read())
        connection.request("GET", f"/gradio_api/queue/data?session_hash={client.session_hash}")
        stream = connection.getresponse()
        deadline = time.monotonic() + ANSWER_WITHIN_S
        while time.monotonic() < deadline:  # the first streamed piece of the answer
            line = stream.fp.readline()
            if line.startswith(b"data:") and json.loads(line[5:])["msg"] == "process_generating":
                break
        else:
            pytest.fail("the answer did not start streaming")
        closed_at = time.monotonic()
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        return closed_at
    finally:
        client.close()


@pytest.mark.parametrize("leave", [_cancel_job, _close_connection], ids=["job-cancelled", "connection-closed"])
def test_a_session_that_goes_away_mid_answer_frees_the_model(server, leave):
    marker = f"Gone {leave.__name__}"
    interrupted_at = leave(server, marker)
    assert_model_freed(server, marker, interrupted_at)


# -- a failure inside generation ------------------------------------------------------------------


def test_a_failure_inside_generation_reaches_only_its_session(server):
    fine = [f"Fine question {index}?" for index in range(2)]
    ready = threading.Barrier(len(fine) + 1, timeout=ANSWER_WITHIN_S)
    failing = Client(server.url, verbose=False, download_files=False)
    try:
        (chat, _, status), *answered = at_once(
            partial(converse, failing, f"{FAIL_MARKER} on this question?", ready=ready),
            *[partial(ask, server.url, text, ready=ready) for text in fine],
        )
        assert status == "Generation failed."
        assert texts(chat[-1]) == [f"**Error:** Generation failed: {INJECTED_ERROR}"]
        for text, (chat, _, status) in zip(fine, answered):  # the others' answers are whole and their own
            assert texts(chat[0]) == [text] and texts(chat[1]) == [expected_answer(server.chat, text)[0]]
            assert "tokens/s" in status

        # the failed session goes on: its next message is answered (the failed turn stays on its page)
        chat, _, status = converse(failing, "And a normal question now?")
        assert "tokens/s" in status and len(chat) == 4 and texts(chat[-1])
    finally:
        failing.close()
    chat, _, status = ask(server.url, "A new session after the failure?")  # and the server serves new ones
    assert "tokens/s" in status and texts(chat[-1])


# -- uploads --------------------------------------------------------------------------------------


def upload(url: str, name: str, data: bytes) -> tuple[int, str]:
    """POST one file to Gradio's upload route, as the page does: (HTTP status, body)."""
    boundary = uuid.uuid4().hex
    body = b"".join([
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'.encode(),
        b"Content-Type: image/png\r\n\r\n", data, f"\r\n--{boundary}--\r\n".encode(),
    ])  # fmt: skip
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    request = urllib.request.Request(f"{url}gradio_api/upload", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_an_upload_over_the_limit_is_refused_and_a_normal_image_is_accepted(server, tmp_path):
    limit = MAX_UPLOAD_MB * 2**20
    with urllib.request.urlopen(f"{server.url}config", timeout=30) as response:
        config = json.load(response)
    assert config["max_file_size"] == limit  # the page knows it too, and checks before uploading
    assert f"up to {MAX_UPLOAD_MB} MB" in json.dumps(config)  # and says it

    code, message = upload(server.url, "huge.png", b"\x89PNG\r\n\x1a\n" + bytes(limit))  # a few bytes too many
    assert code == 413 and message == f"File size exceeded maximum allowed size of {limit} bytes."

    street = (IMAGES / "street.png").read_bytes()
    code, body = upload(server.url, "street.png", street)
    assert code == 200
    (stored,) = json.loads(body)
    assert Path(stored).read_bytes() == street

    # under the limit but not an image: refused in the chat, named as uploaded (never by its path on the
    # server), with the reason; the session goes on
    fake = tmp_path / "photo.png"
    fake.write_bytes(b"this is no picture")
    client = Client(server.url, verbose=False, download_files=False)
    try:
        chat, _, status = converse(client, "What is this?", [fake])
        assert status == "The message was not accepted."
        error = texts(chat[-1])[0]
        assert error.startswith("**Error:** Cannot answer this message: the image 'photo.png' could not be read")
        assert "not an image" in error and str(Path(stored).parents[1]) not in error  # the upload folder
        chat, _, status = converse(client, "Then this one.", [IMAGES / "shapes.png"])
        assert "tokens/s" in status and texts(chat[-1])
    finally:
        client.close()


def test_the_page_refuses_an_image_over_the_limit_with_a_clear_message(server, tmp_path):
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright is not installed (pip install playwright; it drives Debian's chromium)")
    chromium = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    huge = tmp_path / "huge.png"
    with open(huge, "wb") as file:
        file.truncate(MAX_UPLOAD_MB * 2**20 + 1)
    off_machine = []

    def only_this_machine(route):
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            off_machine.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.route("**/*", only_this_machine)
            page.set_default_timeout(60_000)
            page.goto(server.url)
            expect(page.get_by_text(f"each may be up to {MAX_UPLOAD_MB} MB")).to_be_visible(timeout=60_000)
            page.locator("#message input[type=file]").set_input_files(str(huge))
            refusal = page.get_by_text(f"exceed the maximum allowed size of {MAX_UPLOAD_MB}.0 Mb")
            expect(refusal).to_be_visible(timeout=60_000)
            expect(page.locator("#message img")).to_have_count(0)  # nothing was attached
        finally:
            browser.close()
    assert not off_machine
