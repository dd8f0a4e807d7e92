"""inference.py / deepseek-vl2 as a user runs it: subprocesses on built checkpoints."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from deepseek_vl2.cli import main
from deepseek_vl2.testing.checkpoints import build_checkpoint
from deepseek_vl2.testing.scripted import script_checkpoint

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
BOX_ANSWER = "<|ref|>the red car<|/ref|><|det|>[[100, 600, 370, 830]]<|/det|>"
UNICODE_ANSWER = "Voilà 日本"


def cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "inference.py"), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("cli-scripted"), "tiny")
    return script_checkpoint(path, BOX_ANSWER, extra_tokens=("[[100, 600, 370, 830]]",))


@pytest.fixture(scope="module")
def unicode_scripted(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("cli-unicode"), "tiny")
    return script_checkpoint(path, UNICODE_ANSWER, extra_tokens=("日本",))


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
        # found before the demo notice, so before any image is read or model loaded
        (["--demo", "--dtype", "float8"], "unknown dtype 'float8'"),
        (["--demo", "--device", "gpu0"], "unknown device 'gpu0'"),
        (["--demo", "--seed", str(2**70)], "seed must be in"),
        (["--demo", "--stream", "--json"], "--stream and --json cannot be combined"),
        (["--demo", "--save_vis", "no/such/folder/out.png"], "folder no/such/folder does not exist"),
        (["--demo", "--save_vis", "overlay"], "--save_vis overlay: give a file name with an image extension"),
        (["--demo", "--save_vis", "overlay.txt"], "an image extension Pillow can write"),
        (["--model_path", str(ROOT), "--max_new_tokens", "2"], "no config.json"),
        (["--demo", "--image", str(IMAGES)], "is a folder, not an image file"),
        (["--demo", "--system", "Look at <image>."], "--system contains <image>"),
        (["--model_path", "x/y", "--save_vis", "out.png"], "--save_vis needs an --image"),
        (["--model_path", "x/y", "--image", str(IMAGES / "street.png"), "--prompt", "<image> or <image>?"],
         "--prompt has 2 <image> placeholder(s) but 1 image(s)"),  # fmt: skip
        (["ask", "--demo", "--chunk_size", "-5"], "--chunk_size must be a positive whole number of tokens, got -5"),
        (["--demo", "--device_map", "auto", "--max_memory", "cpu"], "max_memory: cannot read 'cpu'; write DEVICE=SIZE"),
        (["--demo", "--device_map", "auto", "--max_memory", "=1GiB"], "max_memory: cannot read '=1GiB'"),
        (["--demo", "--device_map", "auto", "--max_memory", "gpu0=1GiB"], "unknown device 'gpu0'; use a GPU index"),
        (["--demo", "--device_map", "auto", "--max_memory", "cpu=1GiB,CPU=2GiB"], "device 'CPU' is given twice"),
        (["--demo", "--device_map", "auto", "--max_memory", "0=lots"], "max_memory for 0: cannot read 'lots'"),
        (["--demo", "--max_memory", "cpu=1GiB"], "without a device_map, max_memory would be ignored"),
        (["--demo", "--offload_folder", "off"], "without a device_map, offload_folder would be ignored"),
        (["--demo", "--device", "cpu", "--device_map", "auto"], "give a device or a device_map, not both"),
    ],
)
def test_errors_are_one_line_without_traceback(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_help_lists_the_commands_and_each_has_its_own(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    listed = capsys.readouterr().out
    assert "ask " in listed and "plan " in listed and "(the default command)" in listed
    for command, flag in (("ask", "--save_vis"), ("plan", "--gpu-memory")):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0 and f"usage: deepseek-vl2 {command}" in capsys.readouterr().out


def help_text(capsys, *command: str) -> str:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    return capsys.readouterr().out


def test_commands_that_load_a_model_take_every_loading_option(capsys):
    loading = ("--model_path", "--model", "--demo", "--device", "--dtype", "--chunk_size", "--device_map",
               "--max_memory", "--offload_folder")  # fmt: skip
    assert all(flag in help_text(capsys, "ask") for flag in loading)
    assert help_text(capsys, "--demo") == help_text(capsys, "ask"), "the bare form's help is ask's"
    planning = help_text(capsys, "plan")
    assert "--model_path PATH, --model PATH" in planning and "--dtype" in planning


def test_ask_is_the_bare_form(checkpoint_dir, capsys):
    args = ["--model_path", str(checkpoint_dir("tiny")), "--image", str(IMAGES / "shapes.png"), "--greedy",
            "--max_new_tokens", "5", "--json"]  # fmt: skip
    answers = []
    for argv in (args, ["ask", *args], ["ask", "--model", *args[1:]]):
        assert main(argv) == 0
        report = json.loads(capsys.readouterr().out)
        answers.append({key: report[key] for key in ("model", "prompt", "answer", "prompt_tokens", "new_tokens")})
    assert answers[0] == answers[1] == answers[2]


def test_offload_to_cpu_and_disk_through_the_cli(checkpoint_dir, ram_for_two_layers, tmp_path, capsys):
    common = ["--model_path", str(checkpoint_dir("tiny")), "--image", str(IMAGES / "shapes.png"), "--dtype", "fp32",
              "--greedy", "--max_new_tokens", "6", "--json"]  # fmt: skip
    assert main(common) == 0
    plain = json.loads(capsys.readouterr().out)
    offload = tmp_path / "offload"
    budget = f"cpu={ram_for_two_layers('tiny')}"
    assert main([*common, "--device_map", "auto", "--max_memory", budget, "--offload_folder", str(offload)]) == 0
    spread = json.loads(capsys.readouterr().out)
    assert any(offload.iterdir()), "some weights were offloaded to disk"
    assert spread["answer"] == plain["answer"] and spread["prompt_tokens"] == plain["prompt_tokens"]


def test_loading_flags_read_back_as_the_same_options():
    from deepseek_vl2.cli import build_parser
    from deepseek_vl2.options import loading_flags, loading_options

    given = {"dtype": "bfloat16", "device_map": "auto", "max_memory": {0: "20.5GiB", "cpu": "48GiB", "disk": 2**40},
             "offload_folder": "offload", "chunk_size": 512, "quantization": "int4"}  # fmt: skip
    args = build_parser().parse_args(["ask", "--demo", *loading_flags(**given)])
    read_back = {0: int(20.5 * 2**30), "cpu": 48 * 2**30, "disk": 2**40}
    assert loading_options(args) == {**given, "device": None, "max_memory": read_back}
    with pytest.raises(TypeError, match="not a loading option: model"):
        loading_flags(model="x")


def test_plan_offline_is_one_line_without_the_hub_retries(monkeypatch, capsys):
    import logging

    from huggingface_hub.utils import logging as hub_logging

    import deepseek_vl2.planner as planner

    def offline(*args, **kwargs):
        hub_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise OSError("cannot reach the hub")

    class Shown(logging.Handler):
        records: list = []

        def emit(self, record):
            self.records.append(record.getMessage())

    hub_root = logging.getLogger("huggingface_hub")
    monkeypatch.setattr(hub_root, "level", hub_root.level)  # restored after the test
    monkeypatch.setattr(hub_root, "propagate", hub_root.propagate)
    monkeypatch.setattr(hub_root, "handlers", [*hub_root.handlers, Shown()])
    monkeypatch.setattr(planner, "plan_memory", offline)
    assert main(["plan", "--model", "org/name", "--gpu-memory", "1GiB"]) == 2
    assert capsys.readouterr().err == "deepseek-vl2 plan: error: cannot reach the hub\n"
    assert Shown.records == []


def test_streamed_answer_is_the_answer_without_end_token(scripted):
    done = cli("--model_path", str(scripted), "--stream", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout == BOX_ANSWER + "\n"


def test_save_vis_without_boxes_says_nothing_was_saved(checkpoint_dir, tmp_path, capsys):
    overlay = tmp_path / "overlay.png"
    args = ["--model_path", str(checkpoint_dir("tiny")), "--image", str(IMAGES / "street.png"), "--greedy",
            "--max_new_tokens", "2", "--no-stream", "--save_vis", str(overlay)]  # fmt: skip
    assert main(args) == 0
    assert f"no grounding boxes in the answer: nothing saved to {overlay}" in capsys.readouterr().err
    assert not overlay.exists()


def test_ctrl_c_while_streaming_ends_the_line_and_exits_130(checkpoint_dir, capsys, monkeypatch, sigint_raises):
    import _thread

    from deepseek_vl2.chat import DeepseekVL2Chat

    real_stream = DeepseekVL2Chat.stream

    def interrupted_after_first_piece(self, *args, **kwargs):
        for piece in real_stream(self, *args, **kwargs):
            yield piece
            _thread.interrupt_main()  # what Ctrl-C does
            time.sleep(10)

    monkeypatch.setattr(DeepseekVL2Chat, "stream", interrupted_after_first_piece)
    path = checkpoint_dir("tiny")
    capsys.readouterr()  # what building the checkpoint printed
    started = time.perf_counter()
    assert main(["--model_path", str(path), "--max_new_tokens", "2000", "--stream", "--quiet"]) == 130
    assert time.perf_counter() - started < 10
    out, err = capsys.readouterr()
    assert out.strip() and out.endswith("\n") and err == "interrupted\n"


def test_closed_pipe_stops_quietly(checkpoint_dir):
    command = [sys.executable, str(ROOT / "inference.py"), "--model_path", str(checkpoint_dir("tiny")), "--stream",
               "--quiet", "--max_new_tokens", "2000", "--temperature", "1.0"]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as reader:
        assert reader.stdout.read(1)  # the answer has started
        reader.stdout.close()  # what `| head -c 1` does
        err = reader.stderr.read().decode()
        assert reader.wait(timeout=120) == 141
    assert err == ""


def test_terminal_that_cannot_encode_the_answer_gets_valid_output(unicode_scripted):
    import os

    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    common = [sys.executable, str(ROOT / "inference.py"), "--model_path", str(unicode_scripted), "--quiet",
              "--prompt", "Où est la voiture ?"]  # fmt: skip
    plain = subprocess.run([*common, "--no-stream"], capture_output=True, env=env, timeout=240)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.decode("ascii") == UNICODE_ANSWER.encode("ascii", "backslashreplace").decode() + "\n"
    as_json = subprocess.run([*common, "--json"], capture_output=True, env=env, timeout=240)
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout.decode("ascii"))
    assert report["answer"] == UNICODE_ANSWER and report["prompt"].endswith("Où est la voiture ?\n\n<|Assistant|>:")


def test_help_needs_neither_gpu_nor_gradio():
    script = (
        "import sys; sys.modules['gradio'] = None\n"  # importing gradio would now fail
        "from deepseek_vl2.cli import main\n"
        "for argv in (['--help'], ['ask', '--help'], ['plan', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0\n"
        "assert 'gradio' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--model_path" in done.stdout and "--demo" in done.stdout
