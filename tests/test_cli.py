"""inference.py / deepseek-vl2 as a user runs it: subprocesses on built checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from deepseek_vl2.cli import main
from deepseek_vl2.testing.checkpoints import build_checkpoint
from deepseek_vl2.testing.scripted import script_checkpoint

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
BOX_ANSWER = "<|ref|>the red car<|/ref|><|det|>[[100, 600, 370, 830]]<|/det|>"


def cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "inference.py"), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("cli-scripted"), "tiny")
    return script_checkpoint(path, BOX_ANSWER, extra_tokens=("[[100, 600, 370, 830]]",))


def test_json_and_save_vis_with_one_image(scripted, tmp_path):
    overlay = tmp_path / "overlay.png"
    done = cli("--model_path", str(scripted), "--image", str(IMAGES / "street.png"), "--prompt", "Where is the red car?",
               "--json", "--save_vis", str(overlay))  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["answer"] == BOX_ANSWER and report["text"] == "the red car"
    (car,) = report["boxes"]
    assert car["label"] == "the red car" and car["boxes_0_999"] == [[100, 600, 370, 830]]
    assert car["boxes_pixels"][0] == pytest.approx([100 * 800 / 999, 600 * 520 / 999, 370 * 800 / 999, 830 * 520 / 999])
    assert report["saved_visualisations"] == [str(overlay)]
    assert set(report["timings"]) >= {"load_s", "prefill_s", "tokens_per_s"}
    original = Image.open(IMAGES / "street.png").convert("RGB")
    drawn = Image.open(overlay)
    assert drawn.size == original.size
    x1, y1 = round(100 * 800 / 999), round(600 * 520 / 999)
    assert ImageChops.difference(drawn, original).getbbox() is not None
    assert drawn.getpixel((x1, y1 + 20)) != original.getpixel((x1, y1 + 20)), "the box's left edge is drawn"
    assert drawn.getpixel((700, 100)) == original.getpixel((700, 100)), "far from the box nothing changes"


def test_three_images_and_chunked_prefill_matches_full(checkpoint_dir):
    path = str(checkpoint_dir("tiny"))
    images = [a for name in ("shapes.png", "shelf.png", "street.png") for a in ("--image", str(IMAGES / name))]
    common = ["--model_path", path, *images, "--prompt", "Compare <image>, <image> and <image>.", "--greedy",
              "--max_new_tokens", "8", "--json"]  # fmt: skip
    full = cli(*common)
    chunked = cli(*common, "--chunk_size", "8")
    assert full.returncode == 0 and chunked.returncode == 0, full.stderr + chunked.stderr
    full, chunked = json.loads(full.stdout), json.loads(chunked.stdout)
    assert full["prompt"].count("<image>") == 3
    assert full["prompt_tokens"] == chunked["prompt_tokens"] > 3 * 421
    assert chunked["answer"] == full["answer"]


def test_plain_output_prints_answer_and_timings(checkpoint_dir, capsys):
    assert main(["--model_path", str(checkpoint_dir("tiny")), "--max_new_tokens", "4", "--greedy", "--no-stream"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() != "" and "decode" in err and "tok/s" in err


def test_quiet_prints_no_timings(checkpoint_dir, capsys):
    assert main(["--model_path", str(checkpoint_dir("tiny")), "--max_new_tokens", "2", "--quiet", "--no-stream"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no model given"),
        (["--model_path", "./no/such/folder"], "checkpoint folder not found"),
        (["--demo", "--model_path", "x/y"], "either --demo or --model_path"),
        (["--demo", "--chunk_size", "0"], "--chunk_size"),
        (["--demo", "--temperature", "-1"], "temperature"),
        (["--demo", "--image", "missing.png"], "missing.png"),
    ],
)
def test_errors_are_one_line_without_traceback(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_help_needs_neither_gpu_nor_gradio():
    script = (
        "import sys; sys.modules['gradio'] = None\n"  # importing gradio would now fail
        "from deepseek_vl2.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'gradio' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--model_path" in done.stdout and "--demo" in done.stdout
