"""The tiling rules (``models/tiling.py``) are what the processor does, and images of any aspect ratio are processed.

Images thinner than Pillow can pad (1x10000, 10000x1) keep a one-pixel short side, the rest padding;
every other image is padded exactly as ``ImageOps.pad`` pads it.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from deepseek_vl2.models.processing import pad_to_view
from deepseek_vl2.models.tiling import (
    MAX_IMAGES_WITH_TILING,
    num_image_tokens,
    num_tiles,
    tile_grid,
    tile_grids,
    tiles_and_tokens,
    tiling_enabled,
)

USER, ASSISTANT = "<|User|>", "<|Assistant|>"
TILE = 384
MEAN = (127, 127, 127)  # int(0.5 * 255): the processor's padding colour
BOXES = [(384, 384), (384, 768), (1152, 384), (768, 768), (384, 3456)]


@pytest.fixture(scope="module")
def processor(loaded):
    return loaded("tiny")[1]


def noise_image(width, height, seed=0):
    """A non-uniform image of any size, cheap to make: 16x16 noise scaled up."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    return small.resize((width, height), Image.NEAREST)


def chat(images):
    return [{"role": USER, "content": "<image>" * images + "\nWhat is this?"}, {"role": ASSISTANT, "content": ""}]


# ---------------------------------------------------------------------------------------------- the rules


def test_more_than_two_images_turn_tiling_off():
    assert MAX_IMAGES_WITH_TILING == 2
    assert [tiling_enabled(count) for count in range(5)] == [True, True, True, False, False]
    resolutions = [(384, 384), (768, 384)]
    assert tile_grid((800, 400), resolutions) == (2, 1)
    assert tile_grid((800, 400), resolutions, tiling=False) == (1, 1)
    assert tile_grids([(800, 400)] * 2, resolutions) == [(2, 1)] * 2
    assert tile_grids([(800, 400)] * 3, resolutions) == [(1, 1)] * 3
    assert tile_grids([], resolutions) == []


def test_tiles_and_tokens_of_known_grids():
    assert num_tiles((1, 1)) == 2 and num_tiles((3, 2)) == 7
    rules = {"tile_size": TILE, "patch_size": 14, "downsample_ratio": 2}
    assert num_image_tokens((1, 1), **rules) == 14 * 15 + 1 + 14 * 15 == 421
    assert num_image_tokens((1, 9), **rules) == 14 * 15 + 1 + (9 * 14) * 15 == 2101
    assert num_image_tokens((2, 2), tile_size=TILE, patch_size=16, downsample_ratio=4) == 6 * 7 + 1 + 12 * 13
    resolutions = [(384, 384), (768, 384)]
    assert tiles_and_tokens([], resolutions, patch_size=14, downsample_ratio=2) == (0, 0)
    wide, small = (800, 400), (10, 10)  # grids (2, 1) and (1, 1)
    tokens = num_image_tokens((2, 1), **rules) + 421
    assert tiles_and_tokens([wide, small], resolutions, patch_size=14, downsample_ratio=2) == (3 + 2, tokens)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.tuples(st.integers(1, 3000), st.integers(1, 3000)), min_size=1, max_size=3))
@example(sizes=[(1400, 300), (300, 1400)])
@example(sizes=[(4000, 3000)])
@example(sizes=[(1, 10000), (9000, 3), (640, 480)])
def test_the_rules_give_the_processors_grids_tiles_and_tokens(processor, sizes):
    images = [Image.new("RGB", size, "white") for size in sizes]
    sample = processor.process_one(chat(len(images)), images)
    resolutions = processor.candidate_resolutions
    settings_ = {"patch_size": processor.patch_size, "downsample_ratio": processor.downsample_ratio}

    grids = tile_grids(sizes, resolutions)
    assert sample.images_spatial_crop.tolist() == [list(grid) for grid in grids]
    assert sample.num_image_tokens == [num_image_tokens(grid, tile_size=TILE, **settings_) for grid in grids]
    assert tiles_and_tokens(sizes, resolutions, **settings_) == (sample.images.shape[0], sum(sample.num_image_tokens))
    tiling = tiling_enabled(len(sizes))
    assert [processor.tile_grid(size, tiling) for size in sizes] == grids
    assert [processor.num_image_tokens_for(*grid) for grid in grids] == sample.num_image_tokens
    assert processor.count_tokens(chat(len(images)), images) == len(sample.input_ids)


# ---------------------------------------------------------------------------------------------- thin images


@settings(max_examples=80, deadline=None)
@given(width=st.integers(1, 3000), height=st.integers(1, 3000), box=st.sampled_from(BOXES), seed=st.integers(0, 3))
@example(width=1, height=767, box=(384, 384), seed=0)  # Pillow's short side rounds up to one pixel
@example(width=767, height=1, box=(384, 384), seed=1)
@example(width=1, height=500, box=(384, 768), seed=2)  # below one pixel before rounding
@example(width=2, height=1535, box=(384, 384), seed=3)
@example(width=3, height=9000, box=(384, 3456), seed=0)
@example(width=640, height=480, box=(768, 768), seed=1)
def test_ordinary_images_are_padded_exactly_as_imageops_pads_them(width, height, box, seed):
    image = noise_image(width, height, seed)
    try:
        expected = ImageOps.pad(image, box, color=MEAN)
    except ValueError as error:  # the short side scales to 0 px: a thin image, tested below
        assert "must be > 0" in str(error)
        assume(False)
    padded = pad_to_view(image, box, MEAN)
    assert (padded.mode, padded.size) == (expected.mode, expected.size)
    assert padded.tobytes() == expected.tobytes()


@pytest.mark.parametrize(
    "size, box",
    [((1, 10000), (384, 384)), ((10000, 1), (384, 384)), ((1, 768), (384, 384)), ((1, 10000), (768, 384)),
     ((1, 5000), (384, 768)), ((3, 9000), (384, 384)), ((9000, 3), (1152, 384))],
)  # fmt: skip
def test_a_thin_image_keeps_a_one_pixel_short_side_and_the_rest_is_padding(size, box):
    with pytest.raises(ValueError):
        ImageOps.pad(Image.new("RGB", size), box)  # what the original did with it
    padded = np.asarray(pad_to_view(Image.new("RGB", size, "red"), box, MEAN))
    assert padded.shape == (box[1], box[0], 3)
    red = np.all(padded == (255, 0, 0), axis=-1)
    tall = size[0] < size[1]
    line = red[:, box[0] // 2] if tall else red[box[1] // 2]  # centred, as ImageOps.pad centres
    assert line.all() and red.sum() == line.size, "one full line of the image, in the middle"
    assert np.all(padded[~red] == MEAN), "everything else is padding"


@pytest.mark.parametrize(
    "size, grid, tokens", [((1, 10000), (1, 1), 421), ((10000, 1), (1, 1), 421), ((1, 5000), (1, 1), 421),
                           ((3, 9000), (1, 9), 2101)]
)  # fmt: skip
def test_thin_images_get_an_answer(loaded, size, grid, tokens):
    model, processor = loaded("tiny")
    inputs = processor(conversations=chat(1), images=[Image.new("RGB", size, "red")])
    assert inputs.images_spatial_crop.tolist() == [[list(grid)]]
    assert inputs.num_image_tokens == [[tokens]] and int(inputs.images_seq_mask.sum()) == tokens
    assert inputs.images.shape == (1, 1 + grid[0] * grid[1], 3, TILE, TILE)
    global_view = inputs.images[0, 0]
    middle = global_view[:, :, TILE // 2] if size[0] < size[1] else global_view[:, TILE // 2]
    assert torch.all(middle == torch.tensor([1.0, -1.0, -1.0])[:, None]), "the red line, normalised"
    padding = torch.full((3,), (MEAN[0] / 255 - 0.5) / 0.5)
    assert torch.allclose(global_view[:, 0, 0], padding, rtol=0, atol=1e-6), "the mean colour around it"

    tokenizer = processor.tokenizer
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    prompt = inputs.input_ids.shape[1]
    assert output.shape == (1, prompt + 2)
    assert output[0, :prompt].tolist() == inputs.input_ids[0].tolist()
    assert isinstance(tokenizer.decode(output[0, prompt:]), str)
