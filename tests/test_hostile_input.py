"""Bad input ends in a correct answer or a clear error that names the problem — never a crash deep inside."""

import copy
import io
import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from deepseek_vl2.chat import ContextTooLongError, DeepseekVL2Chat
from deepseek_vl2.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
from deepseek_vl2.utils.io import load_image, load_pil_images

USER, ASSISTANT = "<|User|>", "<|Assistant|>"


@pytest.fixture(scope="module")
def processor(checkpoint_dir):
    return DeepseekVLV2Processor.from_pretrained(checkpoint_dir("tiny"))


def ask(processor, *messages, images=None):
    return processor(conversations=list(messages), images=images, force_batchify=True)


# ---------------------------------------------------------------------------------------------- conversations


def test_placeholder_count_differs_from_image_count(processor):
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) but 1 image\(s\)"):
        ask(processor, {"role": USER, "content": "<image><image> compare"}, images=[Image.new("RGB", (8, 8))])


def test_image_in_an_assistant_turn(processor):
    with pytest.raises(ValueError, match="assistant turn 1 contains <image>"):
        ask(processor, {"role": USER, "content": "hi"}, {"role": ASSISTANT, "content": "<image>"},
            images=[Image.new("RGB", (8, 8))])  # fmt: skip


@pytest.mark.parametrize(
    "messages, error, message",
    [
        ([{"role": "bot", "content": "hi"}], ValueError, "unknown role 'bot'"),
        ([], ValueError, "conversation is empty"),
        ([{"role": USER, "content": 3}], TypeError, "content of type int"),
        ([{"role": USER, "content": None}], TypeError, "content of type NoneType"),
    ],
)
def test_malformed_conversations(processor, messages, error, message):
    with pytest.raises(error, match=message):
        ask(processor, *messages)


def test_conversation_may_end_with_a_user_or_an_assistant_turn(processor):
    open_question = ask(processor, {"role": USER, "content": "hi"})
    empty_answer = ask(processor, {"role": USER, "content": "hi"}, {"role": ASSISTANT, "content": ""})
    assert open_question.input_ids.tolist() == empty_answer.input_ids.tolist()
    assert open_question.sft_format[0].endswith("<|Assistant|>:")
    finished = ask(processor, {"role": USER, "content": "hi"}, {"role": ASSISTANT, "content": "hello"})
    assert finished.sft_format[0].endswith("hello" + processor.tokenizer.eos_token), "a closed exchange"


def test_processing_leaves_the_callers_messages_and_images_untouched(processor):
    """Notebooks re-run cells with the same objects: nothing we are given may change."""
    conversation = [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": " <image>\nWhat is it? ", "images": ["a.png"]},
        {"role": "assistant", "content": " A box. "},
        {"role": "User", "content": "<image> and this?"},
    ]
    images = [Image.new("P", (40, 30), 3), Image.frombytes("I;16", (20, 50), bytes(range(200)) * 10)]
    before = copy.deepcopy(conversation)
    pixels = [(image.mode, image.size, image.tobytes()) for image in images]
    first = ask(processor, *conversation, images=images)
    assert conversation == before
    assert [(image.mode, image.size, image.tobytes()) for image in images] == pixels
    again = ask(processor, *conversation, images=images)
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.images, again.images)


# ---------------------------------------------------------------------------------------------- image files


def write(path, image, **save):
    image.save(path, **save)
    return path


def test_missing_unreadable_and_non_image_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "report.png").write_bytes(b"%PDF-1.7 this is a PDF renamed to .png")
    with pytest.raises(ValueError, match="not an image file.*report.png"):
        load_image(tmp_path / "report.png")
    with pytest.raises(FileNotFoundError, match="is a folder, not an image file"):
        load_image(tmp_path)
    with pytest.raises(ValueError, match="an image path is empty"):
        load_image("")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.jpg"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(TypeError, match="file path or a PIL image"):
        load_image(42)
    with pytest.raises(TypeError, match="single str"):
        load_pil_images([{"role": USER, "content": "<image>", "images": "cat.png"}])


def test_truncated_file(tmp_path):
    whole = io.BytesIO()
    Image.new("RGB", (300, 300), "red").save(whole, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(whole.getvalue()[:200])
    with pytest.raises(ValueError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")


def test_unreadable_pil_image_given_to_the_processor_is_named(processor, tmp_path):
    """A lazily opened PIL image fails only when decoded, deep in tiling: say which image and why."""
    whole = io.BytesIO()
    Image.new("RGB", (300, 300), "red").save(whole, format="PNG", compress_level=0)
    (tmp_path / "cut.png").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    truncated = Image.open(tmp_path / "cut.png")  # the header is intact: opening succeeds
    closed = Image.new("RGB", (8, 8))
    closed.close()
    fine = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match=r"image 1 could not be decoded \(image file is truncated"):
        ask(processor, {"role": USER, "content": "<image><image>"}, images=[fine, truncated])
    with pytest.raises(ValueError, match="image 0 could not be decoded"):
        ask(processor, {"role": USER, "content": "<image>"}, images=[closed])


def test_decompression_bomb_is_refused_with_pillows_limit(tmp_path, monkeypatch):
    path = write(tmp_path / "bomb.png", Image.new("L", (400, 400)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # 400x400 is now over twice the limit
    with pytest.raises(ValueError, match=r"decompression-bomb limit of 20,000 pixels \(twice PIL.Image.MAX_IMAGE_PIXELS\)"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400 * 400 // 2)  # at the limit: Pillow only warns
    with pytest.warns(Image.DecompressionBombWarning):
        assert load_image(path).size == (400, 400)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert load_image(path).getpixel((5, 5)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "I;16", "1", "RGBA", "L", "F"])
def test_every_image_mode_becomes_rgb(mode, processor):
    image = Image.new("RGB", (64, 48), (200, 30, 30)).convert(mode) if mode not in ("I;16", "F") else None
    if mode == "I;16":
        image = Image.frombytes("I;16", (64, 48), bytes(range(256)) * 24)
    if mode == "F":
        image = Image.new("F", (64, 48), 0.5)
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == (64, 48)
    if mode == "I;16":
        assert len(rgb.getcolors(256) or []) > 2, "16-bit data is scaled, not clipped to white"
    ask(processor, {"role": USER, "content": "<image>"}, images=[rgb])


def test_exif_rotated_photo_is_turned_upright(tmp_path):
    image = Image.new("RGB", (60, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: view rotated 90 degrees clockwise
    path = write(tmp_path / "phone.jpg", image, exif=exif)
    assert load_image(path).size == (20, 60)


@pytest.mark.parametrize("size", [(1, 1), (384, 1), (2000, 3), (1, 10000), (10000, 1)])
def test_extreme_but_valid_sizes_are_processed(processor, size):
    out = ask(processor, {"role": USER, "content": "<image>"}, images=[Image.new("RGB", size)])
    assert int(out.images_seq_mask.sum()) == sum(out.num_image_tokens[0])


def test_image_without_pixels_is_a_clear_error(processor):
    with pytest.raises(ValueError, match="image 0 is 0x10000: it has no pixels"):
        ask(processor, {"role": USER, "content": "<image>"}, images=[Image.new("RGB", (0, 10000))])


def test_huge_image_is_refused_by_pillows_guard(tmp_path, monkeypatch):
    """16k x 16k is 268M pixels: over twice Pillow's default limit, so it is a bomb by Pillow's rule."""
    assert 16384 * 16384 > 2 * Image.MAX_IMAGE_PIXELS
    path = write(tmp_path / "huge.png", Image.new("1", (1638, 1638)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS // 100)  # the same ratio, 100x smaller
    with pytest.raises(ValueError, match="decompression-bomb"):
        load_image(path)


# ---------------------------------------------------------------------------------------------- models and settings


def test_prompt_over_the_context_names_the_numbers(checkpoint_dir):
    chat = DeepseekVL2Chat.from_pretrained(checkpoint_dir("tiny"), dtype="fp32")
    images = [Image.new("RGB", (1152, 1152))] * 2  # two 3x3-tiled images: 2 * 1 + 2 * ... tokens
    with pytest.raises(ContextTooLongError, match=r"prompt has \d+ tokens .* > the model's context of 4096"):
        chat.chat("<image><image> compare", images=images, max_new_tokens=1024)


def test_checkpoint_problems_are_named(checkpoint_dir, tmp_path):
    source = checkpoint_dir("tiny")
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        DeepseekVLV2ForCausalLM.from_pretrained(tmp_path / "missing")

    unrelated = tmp_path / "photos"  # an existing folder that holds no checkpoint
    (unrelated / "sub").mkdir(parents=True)
    (unrelated / "cat.png").write_bytes(b"not a checkpoint")
    with pytest.raises(FileNotFoundError, match="photos is not a DeepSeek-VL2 checkpoint folder: it has no config.json"):
        DeepseekVLV2ForCausalLM.from_pretrained(unrelated)
    with pytest.raises(FileNotFoundError, match="it has no processor_config.json"):
        DeepseekVLV2Processor.from_pretrained(unrelated)
    with pytest.raises(FileNotFoundError, match="cat.png is a file; a checkpoint is a folder"):
        DeepseekVLV2ForCausalLM.from_pretrained(unrelated / "cat.png")
    with pytest.raises(FileNotFoundError, match="sub is not a DeepSeek-VL2 checkpoint folder"):
        DeepseekVLV2ForCausalLM.from_pretrained(unrelated, subfolder="sub")

    other = shutil.copytree(source, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' model, not DeepSeek-VL2"):
        DeepseekVLV2ForCausalLM.from_pretrained(other)

    no_shard = shutil.copytree(source, tmp_path / "no-shard")
    shard = sorted(no_shard.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        DeepseekVLV2ForCausalLM.from_pretrained(no_shard)

    from safetensors.torch import load_file, save_file

    wrong = shutil.copytree(source, tmp_path / "wrong-shape")
    index = json.loads((wrong / "model.safetensors.index.json").read_text())
    shard = wrong / index["weight_map"]["view_seperator"]
    tensors = load_file(shard)
    tensors["view_seperator"] = torch.zeros(tensors["view_seperator"].numel() + 1)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"view_seperator: checkpoint \(65,\), model \(64,\)"):
        DeepseekVLV2ForCausalLM.from_pretrained(wrong)


# ---------------------------------------------------------------------------------------------- fuzzing

DOCUMENTED_ERRORS = (ValueError, TypeError)

piece = st.sampled_from(list("ab <>|/\né猫") + ["<image>", "<|ref|>", "<|User|>", "<|Assistant|>", "<|det|>"])
text = st.lists(piece, max_size=12).map("".join)
role = st.sampled_from([USER, ASSISTANT, "user", "assistant", "system", "robot"])
message = st.fixed_dictionaries({"role": role, "content": st.one_of(text, st.integers(), st.none())})
image = st.builds(
    lambda w, h, mode: Image.new(mode, (w, h), 128),
    st.integers(1, 900),
    st.integers(1, 900),
    st.sampled_from(["RGB", "L", "RGBA", "P", "CMYK"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(message, max_size=4), images=st.one_of(st.none(), st.lists(image, max_size=3)))
def test_processor_fuzz_gives_consistent_outputs_or_documented_errors(processor, messages, images):
    try:
        out = processor(conversations=messages, images=images, force_batchify=True)
    except DOCUMENTED_ERRORS as error:
        assert str(error), "errors carry a message"
        return
    length = out.input_ids.shape[1]
    assert out.attention_mask.shape == out.images_seq_mask.shape == (1, length)
    assert out.images_seq_mask.dtype == torch.bool
    assert int(out.images_seq_mask.sum()) == sum(out.num_image_tokens[0])
    assert (out.input_ids[out.images_seq_mask] == processor.image_token_id).all()
    crops = out.images_spatial_crop[0]
    tiles = sum(1 + int(w) * int(h) for w, h in crops.tolist() if w > 0)
    assert tiles <= out.images.shape[1]
    assert len(out.num_image_tokens[0]) == len(images or [])
