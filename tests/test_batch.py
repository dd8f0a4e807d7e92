"""The batch runner: OpenAI batch files in, one result line per request out, resumable after a kill."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from deepseek_vl2.chat import DeepseekVL2Chat  # noqa: E402
from deepseek_vl2.cli import main  # noqa: E402
from deepseek_vl2.server.batch import run_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "endless"


@pytest.fixture(scope="module")
def chat(endless_checkpoint_dir):
    return DeepseekVL2Chat.from_pretrained(endless_checkpoint_dir, dtype="fp32", device="cpu")


def request(custom_id: str, text: str, max_tokens: int = 4, **body) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, **body}  # fmt: skip
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_killed_run_resumes_and_each_custom_id_is_answered_once(chat, endless_checkpoint_dir, tmp_path, capsys):
    lines = [request(f"r{i}", f"Question number {i}?", max_tokens=60) for i in range(5)]
    lines.insert(2, '{"custom_id": "broken", "method": "POST", "url": ')  # not JSON: an error line
    batch, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "deepseek_vl2.cli", "batch", "--model_path", str(endless_checkpoint_dir),
               "--dtype", "fp32", "--device", "cpu", "--served-model-name", MODEL, str(batch), str(output)]  # fmt: skip
    runner = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (output.exists() and output.read_text().count("\n") >= 3):
            assert runner.poll() is None and time.monotonic() < deadline, "the runner ended or stalled"
            time.sleep(0.01)
    finally:
        runner.kill()
        runner.wait()
    killed = results(output)
    assert 3 <= len(killed) < 6  # killed in the middle: some requests were never answered

    summary = run_batch(chat, batch, output, MODEL)
    assert summary.skipped == len(killed) and summary.done == 6 - len(killed)
    progress = capsys.readouterr().err
    assert "request/s" in progress or "s/request" in progress  # the bar shows the rate (and the ETA)
    answered = results(output)
    assert sorted(r["custom_id"] for r in answered if r["custom_id"]) == [f"r{i}" for i in range(5)]
    broken = [r for r in answered if r["custom_id"] is None]
    assert len(broken) == 1 and broken[0]["error"]["line"] == 3 and broken[0]["response"] is None
    solo = chat.chat("Question number 4?", max_new_tokens=60, temperature=0)
    last = next(r for r in answered if r["custom_id"] == "r4")["response"]
    assert last["status_code"] == 200 and last["body"]["choices"][0]["message"]["content"] == solo.answer
    assert last["body"]["usage"]["prompt_tokens"] == solo.prompt_tokens

    assert run_batch(chat, batch, output, MODEL, progress=False).done == 0  # a third run has nothing left
    assert len(results(output)) == 6


def test_every_kind_of_bad_line_becomes_one_result_line_and_the_run_goes_on(chat, tmp_path):
    lines = [
        "not json at all",
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),
        request("wrong-url", "hi").replace("/v1/chat/completions", "/v1/embeddings"),
        request("other-model", "hi", model="gpt-4o"),
        request("unsupported", "hi", n=2),
        request("too-long", "hi", max_tokens=5000),
        request("ok", "hi"),
        request("ok", "again"),
        "",
    ]
    batch, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    batch.write_text("\n".join(lines))
    summary = run_batch(chat, batch, output, MODEL, progress=False)
    assert (summary.done, summary.failed, summary.skipped) == (8, 7, 0)
    by_id = {r["custom_id"]: r for r in results(output) if r["custom_id"]}
    status = {custom_id: r["response"]["status_code"] for custom_id, r in by_id.items()}
    assert status == {"wrong-url": 400, "other-model": 404, "unsupported": 422, "too-long": 400, "ok": 200}
    assert by_id["too-long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    line_errors = {r["error"]["line"]: r["error"]["message"] for r in results(output) if r["custom_id"] is None}
    assert set(line_errors) == {1, 2, 8} and "custom_id" in line_errors[2] and "line 7" in line_errors[8]
    assert by_id["ok"]["response"]["body"]["usage"]["completion_tokens"] == 4
    assert run_batch(chat, batch, output, MODEL, progress=False).skipped == 8


def test_a_folder_of_images_and_one_prompt(endless_checkpoint_dir, tmp_path):
    folder = tmp_path / "eval"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(folder / "b.png")
    Image.new("RGB", (40, 30), "blue").save(folder / "sub" / "a.jpg")
    (folder / "notes.txt").write_text("not an image")
    batch, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    command = ["batch", "--model_path", str(endless_checkpoint_dir), "--dtype", "fp32", "--device", "cpu",
               "--images", str(folder), "--prompt", "What colour?", "--max-tokens", "3", "--temperature", "0",
               "--no-progress", str(batch), str(output)]  # fmt: skip
    assert main(command) == 0
    requests = results(batch)
    assert [r["custom_id"] for r in requests] == ["b.png", "sub/a.jpg"]
    assert requests[0]["body"]["messages"][0]["content"][0]["image_url"]["url"] == (folder / "b.png").resolve().as_uri()
    answered = results(output)
    assert [r["response"]["status_code"] for r in answered] == [200, 200]
    assert answered[1]["response"]["body"]["choices"][0]["message"]["grounding"]["images"][0]["width"] == 40
    assert answered[0]["response"]["body"]["model"] == endless_checkpoint_dir.name  # the folder's name

    assert main(command) == 0 and len(results(output)) == 2  # the same command again: nothing left to do
    other_prompt = ["Which colour?" if part == "What colour?" else part for part in command]
    assert main(other_prompt) == 2  # it would overwrite in.jsonl with other requests
