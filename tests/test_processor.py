"""The processor gives the original's token ids, image tiles and chat format, and fixes its bugs.

Expected values come from a direct re-implementation of the original's rules written here (best
tile grid, token count formula, tile cropping with PIL, chat strings as literals), not from the
code under test.
"""

import json
import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from transformers import PreTrainedTokenizerFast

from deepseek_vl2.models.conversation import place_images
from deepseek_vl2.models.processing import DeepseekVLV2Processor, select_best_resolution
from deepseek_vl2.testing.checkpoints import CANDIDATE_RESOLUTIONS
from deepseek_vl2.testing.published import published_layout
from deepseek_vl2.testing.tokenizer import build_tokenizer
from deepseek_vl2.utils.io import load_image, load_pil_images

EOS_TEXT = "<｜end▁of▁sentence｜>"
ADDED_TOKENS = ["<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>"]
TILE = 384
IGNORE = -100


# ---------------------------------------------------------------------------------------------
# The original's rules, written out directly.


def reference_best_resolution(width, height):
    def kept(candidate):
        scale = min(candidate[0] / width, candidate[1] / height)
        return min(int(width * scale) * int(height * scale), width * height)

    # max() keeps the first of equal keys, like the original's strict comparisons.
    return tuple(max(CANDIDATE_RESOLUTIONS, key=lambda c: (kept(c), -(c[0] * c[1] - kept(c)))))


def reference_token_count(grid_width, grid_height):
    side = -(-(TILE // 14) // 2)  # ceil(27 / 2) = 14 features per side after 2x2 downsampling
    return side * (side + 1) + 1 + (grid_height * side) * (grid_width * side + 1)


def reference_tiles(image, grid):
    """Global view then local tiles row by row, normalised to [-1, 1], as (n, 3, 384, 384)."""
    best_width, best_height = grid[0] * TILE, grid[1] * TILE
    views = [ImageOps.pad(image, (TILE, TILE), color=(127, 127, 127))]
    local = ImageOps.pad(image, (best_width, best_height), color=(127, 127, 127))
    corners = [(x, y) for y in range(0, best_height, TILE) for x in range(0, best_width, TILE)]
    views += [local.crop((x, y, x + TILE, y + TILE)) for x, y in corners]
    pixels = np.stack([np.asarray(view, dtype=np.float32) / np.float32(255) for view in views])
    return torch.from_numpy((pixels - np.float32(0.5)) / np.float32(0.5)).permute(0, 3, 1, 2)


def reference_ids(processor, turns, images, system="", grids=None):
    """bos; per user turn '[system\\n\\n]<|User|>: q\\n\\n<|Assistant|>:' with image runs; per answer text + eos."""
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    grids = grids or [None] * len(images)
    ids, remaining = [tokenizer.bos_token_id], iter(zip(images, grids))
    for index, (role, text) in enumerate(turns):
        if role == "assistant":
            ids += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
            continue
        prompt = (f"{system}\n\n" if system and index == 0 else "") + f"<|User|>: {text}\n\n<|Assistant|>:"
        for position, piece in enumerate(prompt.split("<image>")):
            if position:
                image, grid = next(remaining)
                grid = grid or tuple(side // TILE for side in reference_best_resolution(*image.size))
                ids += [image_id] * reference_token_count(*grid)
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids[:-1]  # inference mode: no eos after the final (empty) answer


def noise_image(width, height, seed=0):
    """A non-uniform image of any size, cheap to make: 16x16 noise scaled up."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    return small.resize((width, height), Image.NEAREST)


def user(content, **extra):
    return {"role": "<|User|>", "content": content, **extra}


def assistant(content=""):
    return {"role": "<|Assistant|>", "content": content}


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    dirs = {}
    for flavor in ("tiny", "small"):
        dirs[flavor] = tmp_path_factory.mktemp(f"tokenizer-{flavor}")
        build_tokenizer(dirs[flavor], flavor)
    return dirs


def new_processor(tokenizer_dirs, flavor="tiny", **settings):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dirs[flavor])
    return DeepseekVLV2Processor(tokenizer, CANDIDATE_RESOLUTIONS, **settings)


@pytest.fixture(scope="module")
def processor(tokenizer_dirs):
    return new_processor(tokenizer_dirs)


# ---------------------------------------------------------------------------------------------
# Tiling and image tokens


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 6000), height=st.integers(1, 6000))
@example(width=1, height=1)
@example(width=384, height=384)
@example(width=4000, height=3000)
def test_best_resolution_follows_the_original_rule(width, height):
    assert select_best_resolution((width, height), CANDIDATE_RESOLUTIONS) == reference_best_resolution(width, height)


def test_best_resolution_ties_go_to_the_earlier_candidate():
    # both keep all 100x100 pixels and pad the same area: the first listed wins
    assert select_best_resolution((100, 100), [(200, 100), (100, 200)]) == (200, 100)
    assert select_best_resolution((100, 100), [(100, 200), (200, 100)]) == (100, 200)


def test_best_resolution_known_grids():
    assert select_best_resolution((640, 480), CANDIDATE_RESOLUTIONS) == (768, 768)
    assert select_best_resolution((300, 1400), CANDIDATE_RESOLUTIONS) == (384, 1536)
    assert select_best_resolution((40, 30), CANDIDATE_RESOLUTIONS) == (384, 384)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(width=st.integers(1, 1800), height=st.integers(1, 1800), seed=st.integers(0, 3))
@example(width=1, height=1, seed=0)
@example(width=40, height=30, seed=1)
@example(width=300, height=1400, seed=2)
@example(width=4000, height=3000, seed=3)
def test_one_image_ids_pixels_and_masks_match_reference(processor, width, height, seed):
    assume(round(min(width, height) / max(width, height) * TILE) > 0)  # thinner: ImageOps.pad fails (test_tiling.py)
    image = noise_image(width, height, seed)
    out = processor(conversations=[user("<image>\nWhat is this?"), assistant()], images=[image])

    grid = tuple(side // TILE for side in reference_best_resolution(width, height))
    expected_ids = reference_ids(processor, [("user", "<image>\nWhat is this?"), ("assistant", "")], [image])
    assert out.input_ids[0].tolist() == expected_ids
    assert out.images_spatial_crop.tolist() == [[list(grid)]]
    assert out.num_image_tokens == [[reference_token_count(*grid)]]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert out.images_seq_mask.dtype == torch.bool
    assert torch.equal(out.images_seq_mask[0], out.input_ids[0] == image_id)
    assert torch.equal(out.images[0], reference_tiles(image, grid))
    assert out.images.dtype == torch.float32


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.tuples(st.integers(3, 1500), st.integers(3, 1500)), min_size=3, max_size=4))
@example(sizes=[(1400, 300), (300, 1400), (4000, 3000)])
def test_more_than_two_images_are_not_tiled(processor, sizes):
    images = [noise_image(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    turns = [("user", "<image> and <image>"), ("assistant", "Two."), ("user", "Now " + "<image>" * (len(images) - 2))]
    conversation = [user(turns[0][1]), assistant("Two."), user(turns[2][1])]
    out = processor(conversations=conversation, images=images)

    grids = [(1, 1)] * len(images)
    assert out.input_ids[0].tolist() == reference_ids(processor, turns + [("assistant", "")], images, grids=grids)
    assert out.images_spatial_crop[0].tolist() == [[1, 1]] * len(images)
    assert out.num_image_tokens == [[reference_token_count(1, 1)] * len(images)] == [[421] * len(images)]
    assert torch.equal(out.images[0], torch.cat([reference_tiles(image, (1, 1)) for image in images]))


def test_turning_tiling_off_is_logged_not_printed(processor, caplog, capfd):
    images = [noise_image(900, 300, seed) for seed in range(3)]
    with caplog.at_level(logging.INFO, logger="deepseek_vl2"):
        processor(conversations=[user("<image><image><image>")], images=images)
    messages = [record.getMessage() for record in caplog.records]
    assert any("3 images" in message and "without tiling" in message for message in messages)
    assert capfd.readouterr().out == ""


def test_two_images_are_still_tiled(processor):
    images = [noise_image(1400, 300), noise_image(300, 1400, 1)]
    out = processor(conversations=[user("<image><image>Compare.")], images=images)
    assert out.images_spatial_crop[0].tolist() == [[4, 1], [1, 4]]
    assert out.images.shape == (1, 2 * (1 + 4), 3, TILE, TILE)


def test_non_rgb_images_are_converted(processor):
    gray = noise_image(50, 70).convert("L")
    out = processor(conversations=[user("<image>")], images=[gray])
    assert torch.equal(out.images[0], reference_tiles(gray.convert("RGB"), (1, 1)))


def test_sixteen_bit_image_given_directly_is_scaled_not_clipped(processor):
    """Image.open on a 16-bit PNG gives mode I;16; convert("RGB") would clip nearly all of it to white."""
    values = np.linspace(0, 65535, 60 * 40).reshape(40, 60).astype(np.uint16)
    deep = Image.fromarray(values)
    assert deep.mode == "I;16"
    out = processor(conversations=[user("<image>")], images=[deep])
    expected = Image.fromarray(np.round(values / 65535 * 255).astype(np.uint8)).convert("RGB")
    assert torch.equal(out.images[0], reference_tiles(expected, (1, 1)))


# ---------------------------------------------------------------------------------------------
# Chat format


def test_chat_format_single_multi_turn_and_system(processor):
    single = processor(conversations=[user("<image>\nDescribe."), assistant()], images=[noise_image(8, 8)])
    assert single.sft_format == ["<|User|>: <image>\nDescribe.\n\n<|Assistant|>:"]

    multi = processor(conversations=[user(" Hi "), assistant(" Hello! "), user("Who are you?"), assistant()])
    assert multi.sft_format == [
        f"<|User|>: Hi\n\n<|Assistant|>: Hello!{EOS_TEXT}<|User|>: Who are you?\n\n<|Assistant|>:"
    ]
    turns = [("user", "Hi"), ("assistant", "Hello!"), ("user", "Who are you?"), ("assistant", "")]
    assert multi.input_ids[0].tolist() == reference_ids(processor, turns, [])

    system = processor(conversations=[user("Hi")], system_prompt="Be brief.")
    assert system.sft_format == ["Be brief.\n\n<|User|>: Hi\n\n<|Assistant|>:"]


def test_system_text_reaches_the_tokens(processor):
    plain = processor(conversations=[user("Hi")])
    with_prompt = processor(conversations=[user("Hi")], system_prompt="Be brief.")
    with_message = processor(conversations=[{"role": "system", "content": "Be brief."}, user("Hi")])

    assert with_prompt.input_ids.tolist() != plain.input_ids.tolist()
    expected = reference_ids(processor, [("user", "Hi"), ("assistant", "")], [], system="Be brief.")
    assert with_prompt.input_ids[0].tolist() == expected
    decoded = processor.tokenizer.decode(with_prompt.input_ids[0])
    assert decoded == f"{processor.tokenizer.bos_token}Be brief.\n\n<|User|>: Hi\n\n<|Assistant|>:"

    # A system message is tokenized as the original tokenizes it: its text alone, no blank line after.
    tokenizer = processor.tokenizer
    alone = tokenizer.encode("Be brief.", add_special_tokens=False)
    question = reference_ids(processor, [("user", "Hi"), ("assistant", "")], [])
    assert with_message.input_ids[0].tolist() == question[:1] + alone + question[1:]
    assert with_message.sft_format == ["Be brief.<|User|>: Hi\n\n<|Assistant|>:"]


def test_role_spellings_are_equivalent(processor):
    image = noise_image(20, 30)
    canonical = processor(conversations=[user("<image>Q"), assistant("A"), user("R"), assistant()], images=[image])
    for user_role, assistant_role in [("user", "assistant"), ("User", "Assistant"), ("<|user|>", "ASSISTANT")]:
        conversation = [
            {"role": user_role, "content": "<image>Q"},
            {"role": assistant_role, "content": "A"},
            {"role": user_role, "content": "R"},
        ]
        other = processor(conversations=conversation, images=[image])
        assert other.input_ids.tolist() == canonical.input_ids.tolist()
        assert other.sft_format == canonical.sft_format
    system = processor(conversations=[{"role": "system", "content": "S"}, user("Q")])
    api_system = processor(conversations=[{"role": "deepseekapi-sys", "content": "S"}, user("Q")])
    assert api_system.input_ids.tolist() == system.input_ids.tolist()


def test_ending_with_user_turn_equals_ending_with_empty_answer(processor):
    image = noise_image(500, 200)
    open_end = processor(conversations=[user("<image>What?")], images=[image])
    closed = processor(conversations=[user("<image>What?"), assistant("")], images=[image])
    for name in ("input_ids", "labels", "images_seq_mask", "images", "images_spatial_crop"):
        assert torch.equal(getattr(open_end, name), getattr(closed, name)), name
    assert open_end.sft_format == closed.sft_format


@pytest.mark.parametrize(
    "prompt, count, placed",
    [
        ("Describe.", 2, "<image>\n<image>\nDescribe."),
        ("", 1, "<image>\n"),
        ("Describe.", 0, "Describe."),
        ("Compare <image> with <image>.", 2, "Compare <image> with <image>."),
    ],
)
def test_images_go_first_unless_the_prompt_places_them(prompt, count, placed):
    assert place_images(prompt, count) == placed


def test_a_prompt_that_places_too_few_images_is_left_for_the_processor_to_refuse(processor):
    prompt = place_images("<image> and which other?", 2)
    assert prompt == "<image> and which other?"
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 2 image\(s\)"):
        processor(conversations=[user(prompt)], images=[noise_image(40, 30)] * 2)


@pytest.mark.parametrize(
    "prompt, count, error, message",
    [
        (None, 1, TypeError, "prompt must be a string, got NoneType"),
        ("Hi", "2", TypeError, "image_count must be an int, got str"),
        ("Hi", True, TypeError, "image_count must be an int, got bool"),
        ("Hi", -1, ValueError, "image_count must be >= 0, got -1"),
    ],
)
def test_place_images_names_a_bad_argument(prompt, count, error, message):
    with pytest.raises(error, match=message):
        place_images(prompt, count)


def test_training_mode_keeps_eos_and_labels_skip_images(tokenizer_dirs):
    image = noise_image(60, 60)
    conversation = [user("<image>Q"), assistant("Answer.")]
    for mask_prompt in (False, True):
        processor = new_processor(tokenizer_dirs, mask_prompt=mask_prompt)
        out = processor(conversations=conversation, images=[image], inference_mode=False)
        ids, labels = out.input_ids[0], out.labels[0]
        tokenizer = processor.tokenizer
        answer = tokenizer.encode("Answer.", add_special_tokens=False) + [tokenizer.eos_token_id]
        assert ids[-len(answer):].tolist() == answer
        assert labels[-len(answer):].tolist() == answer
        assert (labels[out.images_seq_mask[0]] == IGNORE).all()
        prompt = slice(1, len(ids) - len(answer))
        if mask_prompt:
            expected_prompt = torch.full_like(ids[prompt], IGNORE)
        else:
            expected_prompt = ids[prompt].masked_fill(out.images_seq_mask[0][prompt], IGNORE)
        assert torch.equal(labels[prompt], expected_prompt)
        assert labels[0] == tokenizer.bos_token_id
        # inference mode drops exactly the final eos
        short = processor(conversations=conversation, images=[image])
        assert short.input_ids[0].tolist() == ids[:-1].tolist()


# ---------------------------------------------------------------------------------------------
# Batches, text only, output object


def test_batchify_left_pads_and_keeps_bool_masks(processor):
    long_one = processor.process_one([user("<image>Describe this picture in detail, please.")], [noise_image(900, 300)])
    short_one = processor.process_one([user("Hi")])
    batch = processor.batchify([long_one, short_one])

    seq_len = len(long_one.input_ids)
    pad = len(long_one.input_ids) - len(short_one.input_ids)
    assert batch.input_ids.shape == batch.labels.shape == batch.images_seq_mask.shape == (2, seq_len)
    assert batch.images_seq_mask.dtype == torch.bool
    assert torch.equal(batch.input_ids[0], long_one.input_ids)
    assert torch.equal(batch.input_ids[1, pad:], short_one.input_ids)
    assert (batch.input_ids[1, :pad] == processor.tokenizer.pad_token_id).all()
    assert batch.attention_mask[1].tolist() == [0] * pad + [1] * len(short_one.input_ids)
    assert (batch.labels[1, :pad] == IGNORE).all()
    assert not batch.images_seq_mask[1].any()
    assert torch.equal(batch.images_seq_mask[0], long_one.images_seq_mask)
    assert batch.images.shape == (2, long_one.images.shape[0], 3, TILE, TILE)
    assert torch.equal(batch.images[0], long_one.images)
    assert not batch.images[1].any()
    assert batch.images_spatial_crop.tolist() == [[[3, 1]], [[0, 0]]]
    assert batch.seq_lens == [len(long_one.input_ids), len(short_one.input_ids)]
    assert batch.sft_format == [long_one.sft_format, short_one.sft_format]

    right = processor.batchify([long_one, short_one], padding="right")
    assert torch.equal(right.input_ids[1, : len(short_one.input_ids)], short_one.input_ids)
    assert right.attention_mask[1].tolist() == [1] * len(short_one.input_ids) + [0] * pad


def assert_same_fields(first, second):
    for name in first.keys():
        value, other = getattr(first, name), getattr(second, name)
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name


def test_batchify_takes_batches_and_unbatch_undoes_it(processor):
    two_images = [noise_image(30, 30), noise_image(800, 400)]
    samples = [
        processor.process_one([user("<image><image>Two pictures, described at length.")], two_images),
        processor.process_one([user("Text only.")]),
        processor.process_one([user("<image>")], [noise_image(1000, 100)]),
    ]
    for padding in ("left", "right"):
        for original, recovered in zip(samples, processor.batchify(samples, padding=padding).unbatch(), strict=True):
            assert_same_fields(original, recovered)
    # processor(...) outputs (batches of one) and bigger batches can be batched again
    regrouped = processor.batchify([processor.batchify(samples[:1]), processor.batchify(samples[1:])])
    assert_same_fields(processor.batchify(samples), regrouped)


def test_batchify_pads_image_count_with_zero_rows(processor):
    two = processor.process_one([user("<image><image>")], [noise_image(30, 30), noise_image(800, 400)])
    one = processor.process_one([user("<image>")], [noise_image(30, 30)])
    batch = processor.batchify([one, two])
    # 800x400 keeps all its pixels first at 1152x768 (3x2 tiles): the rule prefers no downscaling.
    assert batch.images_spatial_crop.tolist() == [[[1, 1], [0, 0]], [[1, 1], [3, 2]]]
    assert batch.images.shape[1] == 2 + 7
    assert not batch.images[0, 2:].any()


@pytest.mark.parametrize("no_images", [None, []])
def test_text_only_input(processor, no_images):
    out = processor(conversations=[user("Hello")], images=no_images)
    assert out.images.shape == (1, 1, 3, TILE, TILE) and not out.images.any()
    assert out.images_spatial_crop.shape == (1, 1, 2) and not out.images_spatial_crop.any()
    assert not out.images_seq_mask.any()
    assert out.num_image_tokens == [[]]
    assert out.input_ids[0].tolist() == reference_ids(processor, [("user", "Hello"), ("assistant", "")], [])


def test_output_moves_and_casts_only_pixels(processor):
    out = processor(conversations=[user("<image>")], images=[noise_image(10, 10)])
    assert out.to("cpu").images.dtype == torch.float32
    out = out.to("cpu", dtype=torch.bfloat16)
    assert out.images.dtype == torch.bfloat16
    assert out.input_ids.dtype == out.labels.dtype == out.images_spatial_crop.dtype == torch.long
    assert out.images_seq_mask.dtype == torch.bool
    assert out["images"] is out.images
    assert set(out.keys()) == {
        "sft_format", "input_ids", "attention_mask", "labels", "images", "images_seq_mask",
        "images_spatial_crop", "num_image_tokens", "seq_lens",
    }  # fmt: skip
    assert dict(**out)["input_ids"] is out.input_ids
    with pytest.raises(KeyError):
        out["pixel_values"]


def test_output_cast_with_only_a_dtype_keeps_ids_integer(processor):
    """``inputs.to(model.dtype)`` is a common notebook spelling; it must not reach the ids or masks."""
    out = processor(conversations=[user("<image>")], images=[noise_image(10, 10)]).to(torch.float16)
    assert out.images.dtype == torch.float16
    assert out.input_ids.dtype == out.attention_mask.dtype == out.images_spatial_crop.dtype == torch.long
    assert out.images_seq_mask.dtype == torch.bool
    for bad in [dict(dtype=torch.long), dict(dtype="bfloat16")]:
        with pytest.raises(TypeError, match="floating torch.dtype"):
            out.to("cpu", **bad)
    with pytest.raises(TypeError, match="two dtypes"):
        out.to(torch.float16, torch.bfloat16)
    assert out.images.dtype == torch.float16, "a refused call changes nothing"


def test_unbatched_output(processor):
    sample = processor(conversations=[user("<image>")], images=[noise_image(10, 10)], force_batchify=False)
    assert isinstance(sample.sft_format, str)
    assert sample.input_ids.dim() == 1 and sample.images.shape == (2, 3, TILE, TILE)
    assert sample.images_spatial_crop.tolist() == [[1, 1]]


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "conversation, images, error, message",
    [
        ([user("<image><image>")], [noise_image(5, 5)], ValueError, "2 <image> placeholder(s) but 1 image(s)"),
        ([user("Hi")], [noise_image(5, 5)], ValueError, "0 <image> placeholder(s) but 1 image(s)"),
        ([user("<image>")], None, ValueError, "1 <image> placeholder(s) but 0 image(s)"),
        ([user("Q"), assistant("<image>")], [noise_image(5, 5)], ValueError, "assistant turn 1 contains <image>"),
        ([{"role": "bot", "content": "Hi"}], None, ValueError, "unknown role 'bot'"),
        ([], None, ValueError, "conversation is empty"),
        ([user(["Hi"])], None, TypeError, "has content of type list"),
        ([user("Hi"), {"role": "system", "content": "S"}], None, ValueError, "system message may only come first"),
        ([assistant("Hello")], None, ValueError, "must start with a user turn"),
        ([{"role": "system", "content": "<image>"}, user("Hi")], None, ValueError, "system text contains <image>"),
        ([{"role": "system", "content": "S"}], None, ValueError, "no user message"),
        ([{"content": "Hi"}], None, TypeError, "'role' and 'content'"),
        ([user("<image>")], ["cat.jpg"], TypeError, "image 0 is a str"),
        ([user("<image>")], noise_image(5, 5), TypeError, "images must be a list"),
        (user("Hi"), None, TypeError, "list of message dicts"),
        ([user("<image>")], [Image.new("RGB", (0, 0))], ValueError, "image 0 is 0x0: it has no pixels"),
        ([user("<image>")], [Image.new("RGB", (7, 0))], ValueError, "image 0 is 7x0: it has no pixels"),
    ],
)
def test_bad_input_errors(processor, conversation, images, error, message):
    with pytest.raises(error) as raised:
        processor(conversations=conversation, images=images)
    assert message in str(raised.value)


def test_system_given_twice_and_bad_batch(processor):
    with pytest.raises(ValueError, match="system text given twice"):
        processor(conversations=[{"role": "system", "content": "A"}, user("Hi")], system_prompt="B")
    with pytest.raises(ValueError, match="at least one"):
        processor.batchify([])
    with pytest.raises(ValueError, match="padding must be"):
        processor.batchify([processor.process_one([user("Hi")])], padding="middle")


# ---------------------------------------------------------------------------------------------
# Tokenizers, loading and saving


def test_token_ids_are_added_after_the_vocabulary_in_the_original_order(tokenizer_dirs):
    for flavor in ("tiny", "small"):
        base = PreTrainedTokenizerFast.from_pretrained(tokenizer_dirs[flavor])
        size, had_pad = len(base), base.pad_token is not None
        processor = DeepseekVLV2Processor(base, CANDIDATE_RESOLUTIONS)
        tokenizer = processor.tokenizer
        first = size if had_pad else size + 1  # a missing pad token is added first
        assert tokenizer.convert_tokens_to_ids(ADDED_TOKENS) == list(range(first, first + len(ADDED_TOKENS)))
        assert len(tokenizer) == first + len(ADDED_TOKENS)
        assert processor.image_token_id == first
        assert tokenizer.pad_token == "<｜▁pad▁｜>" and tokenizer.padding_side == "left"
        for token in ADDED_TOKENS:  # each added token is one unit inside text
            assert tokenizer.encode(f"a{token}b", add_special_tokens=False)[1] == tokenizer.convert_tokens_to_ids(token)


def test_tokenizer_flavors_place_special_tokens_differently(tokenizer_dirs, tmp_path):
    tiny = PreTrainedTokenizerFast.from_pretrained(tokenizer_dirs["tiny"])
    small = PreTrainedTokenizerFast.from_pretrained(tokenizer_dirs["small"])
    assert (tiny.bos_token_id, tiny.eos_token_id, tiny.pad_token_id) == (0, 1, 2)
    assert small.pad_token is None and small.bos_token_id > 2 and small.eos_token_id == small.bos_token_id + 1
    assert tiny.bos_token == small.bos_token == "<｜begin▁of▁sentence｜>"
    assert tiny.eos_token == small.eos_token == EOS_TEXT
    tiny_config = json.loads((tokenizer_dirs["tiny"] / "tokenizer_config.json").read_text())
    assert tiny_config["tokenizer_class"] == "LlamaTokenizerFast"  # as published
    assert (tokenizer_dirs["small"] / "special_tokens_map.json").exists()
    # byte-level: any text round-trips
    text = "Ünïcode, 12345 digits and 中文 text\n\n<|User|>:"
    assert tiny.decode(tiny.encode(text, add_special_tokens=False)) == text
    assert tiny.encode("Hi")[0] == tiny.bos_token_id
    build_tokenizer(tmp_path, "tiny")
    assert (tmp_path / "tokenizer.json").read_bytes() == (tokenizer_dirs["tiny"] / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError, match="unknown tokenizer flavor"):
        build_tokenizer(tmp_path, "huge")


def test_processor_uses_each_tokenizers_own_ids(tokenizer_dirs):
    image = noise_image(100, 700)
    conversation = [user("<image>\nRead the sign."), assistant("It says stop."), user("Sure?")]
    outputs = {}
    for flavor in ("tiny", "small"):
        processor = new_processor(tokenizer_dirs, flavor)
        out = processor(conversations=conversation, images=[image])
        turns = [(role, message["content"]) for role, message in zip(("user", "assistant", "user"), conversation)]
        turns.append(("assistant", ""))
        assert out.input_ids[0].tolist() == reference_ids(processor, turns, [image])
        assert out.input_ids[0, 0] == processor.tokenizer.bos_token_id
        image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
        assert torch.equal(out.images_seq_mask[0], out.input_ids[0] == image_id)
        outputs[flavor] = out
    assert outputs["tiny"].input_ids.tolist() != outputs["small"].input_ids.tolist()
    assert torch.equal(outputs["tiny"].images_seq_mask, outputs["small"].images_seq_mask)


@pytest.mark.parametrize("flavor", ["tiny", "small"])
def test_save_and_load_round_trip(tokenizer_dirs, flavor, tmp_path, capfd):
    published_like = tmp_path / "published"
    build_tokenizer(published_like, flavor)
    config = {
        "candidate_resolutions": CANDIDATE_RESOLUTIONS,
        "patch_size": 14,
        "downsample_ratio": 2,
        "mask_prompt": True,
        "processor_class": "DeepseekVLV2Processor",
        "unknown_future_key": 1,
    }
    (published_like / "processor_config.json").write_text(json.dumps(config))
    capfd.readouterr()

    loaded = DeepseekVLV2Processor.from_pretrained(published_like)
    conversation, image = [user("<image>Q"), assistant("A"), user("B")], noise_image(700, 100)
    first = loaded(conversations=conversation, images=[image], inference_mode=False)
    loaded.save_pretrained(tmp_path / "saved")
    again = DeepseekVLV2Processor.from_pretrained(tmp_path / "saved")
    second = again(conversations=conversation, images=[image], inference_mode=False)
    assert capfd.readouterr() == ("", "")  # loading and processing print nothing

    assert loaded.mask_prompt and again.mask_prompt
    assert len(again.tokenizer) == len(loaded.tokenizer)
    assert again.tokenizer.convert_tokens_to_ids(ADDED_TOKENS) == loaded.tokenizer.convert_tokens_to_ids(ADDED_TOKENS)
    for name in ("input_ids", "labels", "images_seq_mask", "images", "images_spatial_crop"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not DeepseekVLV2Processor.from_pretrained(tmp_path / "saved", mask_prompt=False).mask_prompt


def test_saved_processor_config_matches_published(tokenizer_dirs, tmp_path):
    new_processor(tokenizer_dirs).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved == published_layout("tiny")["processor_config"]


def test_published_token_ids_are_reproduced_from_a_published_size_vocabulary(tokenizer_dirs):
    """tiny's tokenizer holds 128815 tokens; the processor must give <image> 128815 ... <|Assistant|> 128822."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dirs["tiny"])
    tokenizer.add_tokens([f"<filler_{i}>" for i in range(128815 - len(tokenizer))])
    processor = DeepseekVLV2Processor(tokenizer, CANDIDATE_RESOLUTIONS)
    assert processor.tokenizer.convert_tokens_to_ids(ADDED_TOKENS) == list(range(128815, 128823))
    assert len(processor.tokenizer) == 128823


def test_image_token_count_formula(processor):
    for grid in [(1, 1), (2, 2), (3, 3), (1, 9), (9, 1), (4, 2)]:
        assert processor.num_image_tokens_for(*grid) == reference_token_count(*grid)
    assert processor.num_image_tokens_for(1, 1) == 14 * 15 + 1 + 14 * 15
    side = math.ceil((TILE // 14) / 2)
    assert processor.num_image_tokens_for(3, 2) == side * (side + 1) + 1 + (2 * side) * (3 * side + 1)


@pytest.mark.parametrize(
    "conversation, sizes, system",
    [
        ([user("Hi")], [], ""),
        ([user("Hi"), assistant("Hello!"), user("And you?")], [], "Be brief."),
        ([user("<image>\nWhat is this?")], [(1400, 300)], ""),
        ([user("<image>\nWhat is this?")], [(300, 1400)], "Be brief."),
        ([user("<image> and <image>"), assistant("Two."), user("Which is wider?")], [(640, 480), (20, 900)], ""),
        ([user("<image> and <image>"), assistant("Two."), user("Now <image>")], [(640, 480), (20, 900), (2000, 700)],
         "Look closely."),
        ([{"role": "system", "content": "Be brief."}, user("<image>" * 3)], [(5, 5), (1024, 1024), (3000, 400)], ""),
    ],
)  # fmt: skip
def test_count_tokens_matches_processing_without_tiling_any_image(processor, monkeypatch, conversation, sizes, system):
    images = [noise_image(width, height, seed) for seed, (width, height) in enumerate(sizes)]
    processed = processor(conversations=conversation, images=images, system_prompt=system)
    training = processor.process_one(conversation, images, inference_mode=False, system_prompt=system)

    def no_pixels(*args, **kwargs):
        raise AssertionError("count_tokens must not resize or normalise images")

    monkeypatch.setattr(processor, "tile_image", no_pixels)
    monkeypatch.setattr(processor, "_to_tensor", no_pixels)
    assert processor.count_tokens(conversation, images, system_prompt=system) == len(processed.input_ids[0])
    assert processor.count_tokens(conversation, images, inference_mode=False, system_prompt=system) == len(
        training.input_ids
    )


def test_count_tokens_rejects_what_processing_rejects(processor):
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) but 1 image\(s\)"):
        processor.count_tokens([user("<image><image>")], [noise_image(5, 5)])
    with pytest.raises(ValueError, match="0x7: it has no pixels"):
        processor.count_tokens([user("<image>")], [Image.new("RGB", (0, 7))])


# ---------------------------------------------------------------------------------------------
# Loading images


def test_load_pil_images_applies_exif_rotation_and_converts(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red, right half blue
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    Image.fromarray(pixels).convert("RGBA").save(tmp_path / "alpha.png")
    frames = [Image.new("P", (8, 8), color) for color in (1, 2)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])

    conversation = [
        user("<image><image>", images=[str(tmp_path / "rotated.jpg"), tmp_path / "alpha.png"]),
        assistant("ok"),
        user("<image>", images=[tmp_path / "anim.gif"]),
    ]
    rotated, alpha, animated = load_pil_images(conversation)
    assert rotated.size == (20, 40) and rotated.mode == "RGB"
    top, bottom = np.asarray(rotated)[2, 10], np.asarray(rotated)[-3, 10]
    assert top[0] > 200 and top[2] < 50  # the red left half is now on top
    assert bottom[2] > 200 and bottom[0] < 50
    assert alpha.mode == "RGB" and alpha.size == (40, 20)
    assert animated.mode == "RGB"
    assert np.array_equal(np.asarray(animated), np.asarray(frames[0].convert("RGB")))
    assert load_image(Image.open(tmp_path / "rotated.jpg")).size == (20, 40)
    assert load_pil_images([user("no images"), assistant("none")]) == []


def test_load_pil_images_takes_null_images_and_names_bad_messages(tmp_path):
    Image.new("RGB", (8, 6)).save(tmp_path / "a.png")
    conversation = [user("Hi", images=None), assistant("Hello"), user("<image>", images=[tmp_path / "a.png"])]
    assert [image.size for image in load_pil_images(conversation)] == [(8, 6)]
    with pytest.raises(TypeError, match="conversations message 1 must be a dict with 'role' and 'content', got '<image>'"):
        load_pil_images([user("Hi"), "<image>"])
    with pytest.raises(TypeError, match="list of message dicts, got NoneType"):
        load_pil_images(None)
    with pytest.raises(TypeError, match="'images' must be a list of paths, got int"):
        load_pil_images([user("<image>", images=3)])


def test_load_pil_images_errors(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_pil_images([user("<image>", images=[missing])])
    not_image = tmp_path / "notes.txt"
    not_image.write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt"):
        load_pil_images([user("<image>", images=[not_image])])
    with pytest.raises(TypeError, match="must be a list of paths"):
        load_pil_images([user("<image>", images=str(not_image))])
