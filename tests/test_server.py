"""The OpenAI-compatible server, driven by the official ``openai`` client over real HTTP (uvicorn on 127.0.0.1)."""

import base64
import contextlib
import http.server
import io
import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402  (comes with openai)
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

from deepseek_vl2.chat import DeepseekVL2Chat  # noqa: E402
from deepseek_vl2.server.app import create_app  # noqa: E402
from deepseek_vl2.server.completion import StopCutter  # noqa: E402
from deepseek_vl2.server.media import MediaError, MediaPolicy  # noqa: E402
from deepseek_vl2.testing.checkpoints import build_checkpoint  # noqa: E402
from deepseek_vl2.testing.scripted import script_checkpoint  # noqa: E402

MODEL, KEY = "tiny-test", "sk-test"
ROOT = Path(__file__).resolve().parents[1]
BOX_ANSWER = "<|ref|>the red car<|/ref|><|det|>[[100, 600, 370, 830]]<|/det|>"


@contextlib.contextmanager
def serving(app):
    """``app`` on uvicorn at a free port of 127.0.0.1, in a background thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def client(base_url: str, key: str = KEY) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=60)


def data_url(image: Image.Image, kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return f"data:image/{kind.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def user(text: str, *urls: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]
            + [{"type": "image_url", "image_url": {"url": url}} for url in urls]}  # fmt: skip


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def chat(endless_checkpoint_dir):
    return DeepseekVL2Chat.from_pretrained(endless_checkpoint_dir, dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    (folder / "allowed").mkdir()
    Image.new("RGB", (64, 48), "green").save(folder / "allowed" / "green.png")
    Image.new("RGB", (64, 48), "blue").save(folder / "secret.png")
    (folder / "allowed" / "link.png").symlink_to(folder / "secret.png")
    return folder


@pytest.fixture(scope="module")
def app(chat, media_dir):
    return create_app(chat, MODEL, api_key=KEY, media=MediaPolicy(local_root=media_dir / "allowed"))


@pytest.fixture(scope="module")
def base_url(app):
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def picture():
    return Image.new("RGB", (320, 200), (200, 40, 40))


def test_image_chat_answers_as_the_chat_api_with_the_processors_token_count(base_url, chat, picture):
    response = client(base_url).chat.completions.create(
        model=MODEL, messages=[user("Describe the image.", data_url(picture))], max_tokens=12, temperature=0
    )
    solo = chat.chat("Describe the image.", images=[picture], max_new_tokens=12, temperature=0)
    conversation, images = chat.build_conversation("Describe the image.", [picture])
    choice = response.choices[0]
    assert choice.message.content == solo.answer and choice.message.role == "assistant"
    assert response.usage.prompt_tokens == chat.processor.count_tokens(conversation, images) == solo.prompt_tokens
    assert response.usage.completion_tokens == solo.new_tokens == 12
    assert response.usage.total_tokens == solo.prompt_tokens + 12
    assert choice.finish_reason == "length" and response.model == MODEL
    assert choice.message.grounding == {"boxes": [], "images": [{"width": 320, "height": 200, "boxes": []}],
                                        "problems": []}  # fmt: skip


def test_stream_pieces_join_to_the_answer_then_usage_and_done(base_url, picture):
    messages = [user("What colour is it?", data_url(picture, "JPEG"))]
    whole = client(base_url).chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client(base_url).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len(pieces) > 3 and "".join(pieces) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    body = {"model": MODEL, "messages": messages, "max_tokens": 2, "stream": True}
    raw = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    events = [line for line in raw.text.split("\n\n") if line]
    assert raw.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"
    assert all(event.startswith("data: ") for event in events)


def test_system_message_and_history_are_the_chat_apis(base_url, chat, picture):
    first = chat.chat("What is this?", images=[picture], system="Answer briefly.", max_new_tokens=6, temperature=0)
    second = chat.chat("And its colour?", history=first.history, max_new_tokens=6, temperature=0)
    messages = [
        {"role": "system", "content": "Answer briefly."},
        user("What is this?", data_url(picture)),
        {"role": "assistant", "content": first.answer},
        {"role": "user", "content": "And its colour?"},
    ]
    response = client(base_url).chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert response.choices[0].message.content == second.answer
    assert response.usage.prompt_tokens == second.prompt_tokens
    assert first.answer != second.answer  # the history changed the answer: it reached the model


def test_sdk_exception_types(base_url):
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with pytest.raises(openai.AuthenticationError):
        client(base_url, key="wrong").chat.completions.create(**ok)
    with pytest.raises(openai.AuthenticationError):
        client(base_url, key="wrong").models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(base_url).chat.completions.create(**{**ok, "model": "gpt-4o"})
    with pytest.raises(openai.BadRequestError, match="content.0.type"):
        client(base_url).chat.completions.create(
            **{**ok, "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}
        )
    with pytest.raises(openai.BadRequestError, match="4096") as too_long:
        client(base_url).chat.completions.create(**{**ok, "max_tokens": 5000})
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.APIStatusError) as too_big:
        huge = "data:image/png;base64," + "A" * (50 * 2**20)
        client(base_url).chat.completions.create(**{**ok, "messages": [user("x", huge)]})
    assert too_big.value.status_code == 413 and too_big.value.code == "request_too_large"
    for unsupported in ({"n": 2}, {"tools": [{"type": "function", "function": {"name": "f"}}]}, {"logprobs": True}):
        with pytest.raises(openai.UnprocessableEntityError):
            client(base_url).chat.completions.create(**ok, **unsupported)
    assert [m.id for m in client(base_url).models.list()] == [MODEL]


def test_eight_concurrent_clients_each_get_their_solo_answer(base_url, chat):
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    images = [[Image.new("RGB", (96, 80), colour)] if index < 2 else [] for index, colour in enumerate(colours)]
    prompts = [f"Is it {colour}?" for colour in colours]
    solo = [chat.chat(p, images=i, max_new_tokens=6, temperature=0).answer for p, i in zip(prompts, images)]

    def ask(index: int) -> str:
        messages = [user(prompts[index], *map(data_url, images[index]))]
        response = client(base_url).chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
        return response.choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == solo and len(set(solo)) == 8


def _forward_counter(chat):
    calls = []
    handle = chat.model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_a_disconnect_mid_stream_frees_the_model_at_the_next_token(base_url, app, chat, caplog):
    caplog.set_level(logging.INFO, logger="deepseek_vl2.server")
    calls, handle = _forward_counter(chat)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 3000,
            "stream": True}  # fmt: skip
    try:
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:  # fmt: skip
            lines = response.iter_lines()
            assert sum(1 for _, line in zip(range(4), lines) if line.startswith("data: ")) == 2
        wait_until(lambda: app.state.engine.running is None)
        assert len(calls) < 200  # the other 2800 tokens were never generated
    finally:
        handle.remove()
    after = client(base_url).chat.completions.create(model=MODEL, messages=[user("Next?")], max_tokens=3)
    assert after.usage.completion_tokens == 3
    assert any("client disconnected" in record.getMessage() for record in caplog.records)


def test_a_client_gone_before_its_whole_answer_frees_the_model_too(base_url, app, chat, caplog):
    caplog.set_level(logging.INFO, logger="deepseek_vl2.server")
    calls, handle = _forward_counter(chat)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Go."}], "max_tokens": 3000})
    host, port = base_url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
            wait_until(lambda: len(calls) > 5)  # generating; then the client hangs up
        wait_until(lambda: app.state.engine.running is None)
        assert len(calls) < 200
    finally:
        handle.remove()
    wait_until(lambda: any(" 499 " in r.getMessage() and "client disconnected" in r.getMessage()
                           for r in caplog.records))  # the request ended too, with its log line  # fmt: skip


def test_a_full_queue_answers_503_with_retry_after(chat):
    long = {"model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 3000, "stream": True}
    short = {"model": MODEL, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2}
    app = create_app(chat, MODEL, max_queue=1)
    with serving(app) as url, ThreadPoolExecutor(max_workers=1) as pool:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=long, timeout=60) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator closes the response
            next(lines)
            wait_until(lambda: httpx.get(f"{url}/health").json()["running"] == 1)  # the long request holds the model
            waiting = pool.submit(client(url, key="unused").chat.completions.create, **short)
            wait_until(lambda: httpx.get(f"{url}/health").json()["waiting"] == 1)
            with pytest.raises(openai.InternalServerError) as refused:
                client(url, key="unused").chat.completions.create(**short)
            assert refused.value.status_code == 503 and refused.value.code == "queue_full"
            assert int(refused.value.response.headers["retry-after"]) > 0
        assert waiting.result(timeout=60).usage.completion_tokens == 2  # served once the stream was dropped


def _post(base_url: str, content: bytes, **headers) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **headers}
    return httpx.post(f"{base_url}/v1/chat/completions", content=content, headers=headers, timeout=60)


def _body(messages, **extra) -> bytes:
    return json.dumps({"model": MODEL, "messages": messages, "max_tokens": 2, **extra}).encode()


TINY_PNG = data_url(Image.new("RGB", (8, 8), "red"))
HOSTILE = {
    "invalid JSON": (b'{"model": "tiny-test", "messages": [', 400, "not valid JSON"),
    "invalid UTF-8": (b'{"model": "tiny-\xff\xfe", "messages": []}', 400, "unicode"),
    "deeply nested JSON": (b'{"model": "tiny-test", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400,
                           "recursion"),
    "10,000 messages": (_body([{"role": "user", "content": "hi"}] * 10_000), 400, "at most 256"),
    "not an object": (b"[1, 2]", 400, "object"),
    "unknown content part": (_body([{"role": "user", "content": [{"type": "video_url", "video_url": "x"}]}]), 400,
                             "'text' or 'image_url'"),
    "unknown role": (_body([{"role": "tool", "content": "x"}]), 400, "role"),
    "too many images": (_body([user("x", *[TINY_PNG] * 9)]), 400, "at most 8"),
    "undecodable image": (_body([user("x", "data:image/png;base64," + base64.b64encode(b"not a png").decode())]), 400,
                          "not a PNG"),
    "not base64": (_body([user("x", "data:image/png;base64,%%%")]), 400, "base64"),
    "a text data URL": (_body([user("x", "data:text/plain;base64,aGk=")]), 400, "not an image"),
    "placeholder without image": (_body([{"role": "user", "content": "<image> what?"}]), 400, "placeholder"),
    "prompt plus max_tokens over the context": (_body([{"role": "user", "content": "hi"}], max_tokens=4096), 400,
                                                "context"),
    "negative temperature": (_body([{"role": "user", "content": "hi"}], temperature=-1), 400, "temperature"),
    "string max_tokens": (_body([{"role": "user", "content": "hi"}], max_tokens="5"), 400, "max_tokens"),
    "assistant last": (_body([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]), 400,
                       "last message"),
    "five stop strings": (_body([{"role": "user", "content": "hi"}], stop=list("abcde")), 400, "stop"),
    "an unknown parameter": (_body([{"role": "user", "content": "hi"}], top_k=5), 422, "top_k"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_input_gets_an_error_object_and_the_server_stays_up(base_url, case):
    content, status, words = HOSTILE[case]
    response = _post(base_url, content)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words.lower() in error["message"].lower()
    assert httpx.get(f"{base_url}/health").json()["status"] == "ok"


def test_a_streamed_body_without_length_is_cut_off_at_the_limit(chat):
    app = create_app(chat, MODEL, max_body_bytes=1000)
    with serving(app) as url:
        response = httpx.post(f"{url}/v1/chat/completions", content=(b" " * 100 for _ in range(50)), timeout=30)
        assert response.status_code == 413 and "1,000-byte limit" in response.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/chat/completions", content=b"x" * 2000).status_code == 413


def test_one_log_line_per_request(base_url, caplog):
    caplog.set_level(logging.INFO, logger="deepseek_vl2.server")
    caplog.clear()
    httpx.get(f"{base_url}/health")
    _post(base_url, b"{")
    client(base_url).chat.completions.create(model=MODEL, messages=[user("hi")], max_tokens=2)

    def lines():
        return [r.getMessage() for r in caplog.records if r.name == "deepseek_vl2.server"]

    wait_until(lambda: len(lines()) >= 3)  # a line is written once its response has been sent
    time.sleep(0.2)
    lines = lines()
    assert len(lines) == 3
    assert "GET /health 200" in lines[0] and "400" in lines[1] and "not valid JSON" in lines[1]
    assert "POST /v1/chat/completions 200" in lines[2] and "completion=2 finish=length" in lines[2]


def test_local_files_only_from_the_allowed_folder(base_url, media_dir):
    inside = (media_dir / "allowed" / "green.png").as_uri()
    response = client(base_url).chat.completions.create(model=MODEL, messages=[user("x", inside)], max_tokens=2)
    assert response.choices[0].message.grounding["images"][0]["width"] == 64
    escapes = {
        "outside": (media_dir / "secret.png").as_uri(),
        "dot-dot": (media_dir / "allowed").as_uri() + "/../secret.png",
        "symlink": (media_dir / "allowed" / "link.png").as_uri(),
        "missing": (media_dir / "allowed" / "none.png").as_uri(),
    }
    for name, url in escapes.items():
        with pytest.raises(openai.BadRequestError, match="outside the allowed folder|not found") as refused:
            client(base_url).chat.completions.create(model=MODEL, messages=[user("x", url)], max_tokens=2)
        assert refused.value.code == "invalid_image", name


def test_remote_urls_and_local_files_are_refused_by_default(chat, media_dir):
    with serving(create_app(chat, MODEL)) as url:
        for image, words in (("https://example.com/cat.png", "--allow-remote-images"),
                             ((media_dir / "allowed" / "green.png").as_uri(), "--allowed-local-media-path"),
                             ("ftp://example.com/cat.png", "unsupported")):  # fmt: skip
            with pytest.raises(openai.BadRequestError, match=words):
                client(url).chat.completions.create(model=MODEL, messages=[user("x", image)], max_tokens=2)


# -- remote images, against a local HTTP server ----------------------------------------------------------


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    png = io.BytesIO()
    Image.new("RGB", (30, 20), "red").save(png, "PNG")

    def do_GET(self):
        if self.path == "/slow.png":
            time.sleep(1.5)
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(self.png.getvalue() * (100 if self.path == "/big.png" else 1))

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_site():
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


def only_127_0_0_1(address) -> bool:
    return address == ipaddress.ip_address("127.0.0.1")


def test_remote_images_need_public_addresses_and_follow_the_rules(image_site):
    with pytest.raises(MediaError, match="non-public address"):
        MediaPolicy(allow_remote=True).load(f"{image_site}/cat.png")  # the default guard: loopback is private
    policy = MediaPolicy(allow_remote=True, address_allowed=only_127_0_0_1, max_bytes=5000, timeout_s=0.5)
    assert policy.load(f"{image_site}/cat.png").size == (30, 20)
    assert policy.load(f"{image_site}/redirect?to={image_site}/cat.png").size == (30, 20)
    other_port = image_site.rsplit(":", 1)[1]
    for url, words in (
        (f"{image_site}/redirect?to=http://127.0.0.2:{other_port}/cat.png", "non-public address"),
        (f"{image_site}/redirect?to=file:///etc/passwd", "only http"),
        (f"{image_site}/big.png", "byte limit"),
        (f"{image_site}/slow.png", "timed out|timeout"),
    ):
        with pytest.raises(MediaError, match=words):
            policy.load(url)


# -- grounding and stop strings, with a model that answers a fixed text -------------------------------


@pytest.fixture(scope="module")
def scripted_url(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("server-scripted"), "tiny", dtype=torch.float32)
    script_checkpoint(path, BOX_ANSWER, extra_tokens=("[[100, 600, 370, 830]]",))
    scripted = DeepseekVL2Chat.from_pretrained(path, dtype="fp32", device="cpu")
    with serving(create_app(scripted, "scripted")) as url:
        yield url, scripted


def test_grounding_boxes_on_the_grid_and_in_pixels_of_each_image(scripted_url):
    url, scripted = scripted_url
    first, last = Image.new("RGB", (999, 333), "white"), Image.new("RGB", (200, 100), "white")
    response = client(url).chat.completions.create(
        model="scripted", messages=[user("<image> and <image>: where is the red car?", data_url(first), data_url(last))]
    )
    message = response.choices[0].message
    assert message.content == BOX_ANSWER and response.choices[0].finish_reason == "stop"
    grounding = message.grounding
    assert grounding["boxes"] == [{"label": "the red car", "boxes_0_999": [[100, 600, 370, 830]]}]
    assert [image["width"] for image in grounding["images"]] == [999, 200]
    assert grounding["images"][0]["boxes"][0]["boxes_pixels"] == [[100.0, 200.0, 370.0, pytest.approx(830 / 3)]]
    assert grounding["images"][1]["boxes"][0]["boxes_pixels"][0] == pytest.approx([100 * 200 / 999, 600 * 100 / 999,
                                                                                   370 * 200 / 999, 830 * 100 / 999])
    tokens = scripted.processor.tokenizer.encode(BOX_ANSWER, add_special_tokens=False)
    assert response.usage.completion_tokens == len(tokens) + 1  # the answer and its end of sentence


def test_a_stop_string_cuts_the_answer_and_generation(scripted_url):
    url, scripted = scripted_url
    for stream in (False, True):
        response = client(url).chat.completions.create(
            model="scripted", messages=[user("Where?")], stop=["<|det|>"], stream=stream,
            stream_options={"include_usage": True} if stream else None,
        )  # fmt: skip
        if stream:
            chunks = list(response)
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish, used = [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage
        else:
            choice, used = response.choices[0], response.usage
            content, finish = choice.message.content, choice.finish_reason
        assert content == "<|ref|>the red car<|/ref|>" and finish == "stop"
        assert used.completion_tokens == len(scripted.processor.tokenizer.encode(content + "<|det|>",
                                                                                  add_special_tokens=False))


def test_stop_cutter_holds_back_what_may_begin_a_stop_string():
    cutter = StopCutter(["END", "\n\n"])
    assert [cutter.feed(piece) for piece in ("Hello E", "N", "d. \n", "x E", "ND more")] == [
        "Hello ", "", "ENd. ", "\nx ", ""
    ]  # fmt: skip
    assert cutter.text == "Hello ENd. \nx " and cutter.stopped and cutter.finish() == ""
    plain = StopCutter([])
    assert plain.feed("a") == "a" and plain.finish() == "" and not plain.stopped
    held = StopCutter(["xyz"])
    assert held.feed("abxy") == "ab" and held.finish() == "xy" and held.text == "abxy"


# -- the command ------------------------------------------------------------------------------------------


def test_serve_command_binds_loopback_and_serves_the_folder_name(endless_checkpoint_dir, tmp_path):
    from deepseek_vl2.server.serve import bind

    with bind("127.0.0.1", 0) as probe:
        port = probe.getsockname()[1]  # a free port, released again
    command = [sys.executable, "-m", "deepseek_vl2.cli", "serve", "--model_path", str(endless_checkpoint_dir),
               "--dtype", "fp32", "--device", "cpu", "--port", str(port), "--api-key", KEY]  # fmt: skip
    server = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until(lambda: server.poll() is None and _answers(f"http://127.0.0.1:{port}/health"), timeout=120)
        assert [m.id for m in client(f"http://127.0.0.1:{port}").models.list()] == [endless_checkpoint_dir.name]
        with pytest.raises(openai.AuthenticationError):
            client(f"http://127.0.0.1:{port}", key="wrong").models.list()
    finally:
        server.terminate()
        log = server.communicate(timeout=60)[1]
    assert "GET /v1/models 200" in log and "GET /v1/models 401" in log


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_serve_command_refuses_bad_options_before_loading(capsys, tmp_path):
    from deepseek_vl2.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert main(["serve", "--demo", "--port", port]) == 2
        assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
    for options, words in ((["--demo", "--model_path", "x"], "not both"), ([], "--model_path"),
                           (["--demo", "--allowed-local-media-path", str(tmp_path / "none")], "not a folder"),
                           (["--demo", "--max-queue", "0"], "--max-queue"), (["--demo", "--dtype", "int3"], "int3"),
                           (["--demo", "--host", "no.such.host.invalid"], "cannot serve"),
                           (["--demo", "--reuse_budget", "lots"], "lots")):  # fmt: skip
        assert main(["serve", *options]) == 2
        assert words in capsys.readouterr().err


def test_serve_and_batch_take_the_reuse_options():
    from deepseek_vl2.cli import build_parser
    from deepseek_vl2.server.loading import check_model_options

    for command in (["serve"], ["batch", "in.jsonl", "out.jsonl"]):
        options = check_model_options(build_parser().parse_args([*command, "--demo", "--reuse_budget", "1GiB"]))
        assert (options["reuse"], options["reuse_budget"]) == (True, 2**30)
        options = check_model_options(build_parser().parse_args([*command, "--demo", "--no-reuse"]))
        assert options["reuse"] is False


def test_default_served_model_name(tmp_path):
    from argparse import Namespace

    from deepseek_vl2.server.loading import default_model_name

    (tmp_path / "my-vl2").mkdir()
    assert default_model_name(Namespace(demo=True, model_path=None)) == "demo"
    hub_id = "deepseek-ai/deepseek-vl2-tiny"
    assert default_model_name(Namespace(demo=False, model_path=hub_id)) == hub_id
    assert default_model_name(Namespace(demo=False, model_path=str(tmp_path / "my-vl2") + "/")) == "my-vl2"
