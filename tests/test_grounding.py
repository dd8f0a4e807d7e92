"""Grounding answers: parsing without eval, cleaning for display, drawing, and the sample images."""

from __future__ import annotations

import ast
import json
import builtins
import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageChops, ImageStat

from deepseek_vl2.grounding import (
    DET_CLOSE,
    DET_OPEN,
    END_OF_SENTENCE,
    GROUNDING,
    REF_CLOSE,
    REF_OPEN,
    Box,
    GroundedObject,
    GroundingResult,
    clean_answer,
    draw_grounding,
    draw_on_images,
    overlays,
    parse_grounding,
)

REPO = Path(__file__).resolve().parents[1]
GREY = (128, 128, 128)


def grounded(label: str | None, *boxes: tuple[int, int, int, int]) -> str:
    det = f"{DET_OPEN}[{', '.join(str(list(box)) for box in boxes)}]{DET_CLOSE}"
    return det if label is None else f"{REF_OPEN}{label}{REF_CLOSE}{det}"


def only_problem_matching(result: GroundingResult, *fragments: str):
    for fragment in fragments:
        assert any(fragment in problem for problem in result.problems), (fragment, result.problems)
    assert len(result.problems) == len(fragments), result.problems


# ---- parsing well-formed answers ------------------------------------------------------------------


def test_visual_grounding_answer():
    result = parse_grounding("<|ref|>The giraffe at the back.<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>")
    assert result.objects == [GroundedObject("The giraffe at the back.", [Box(580, 270, 999, 900)])]
    assert result.problems == []


def test_several_refs_and_boxes_in_order():
    answer = (
        "Sure. " + grounded("Watermelon slices", (10, 20, 110, 220), (500, 40, 620, 300))
        + " and also the " + grounded("knife", (700, 800, 990, 870)) + ".<｜end▁of▁sentence｜>"
    )
    result = parse_grounding(answer)
    assert [obj.label for obj in result.objects] == ["Watermelon slices", "knife"]
    assert result.objects[0].boxes == [Box(10, 20, 110, 220), Box(500, 40, 620, 300)]
    assert result.objects[1].boxes == [Box(700, 800, 990, 870)]
    assert result.problems == []


def test_grounded_conversation_answer_with_newlines_and_cjk_label():
    answer = (
        "You should put it in the <|ref|>trash can<|/ref|>\n<|det|>[[ 12 ,400 , 230, 998 ]]<|/det|>\n"
        "找到<|ref|>淡定姐<|/ref|><|det|>[[1,2,3,4]]<|/det|>"
    )
    result = parse_grounding(answer)
    assert result.objects == [GroundedObject("trash can", [Box(12, 400, 230, 998)]),
                              GroundedObject("淡定姐", [Box(1, 2, 3, 4)])]
    assert result.problems == []


def test_grounded_caption_dets_without_refs_are_expected():
    caption = (
        f"{GROUNDING}Describe the image. A <|ref|>man<|/ref|><|det|>[[100, 200, 300, 900]]<|/det|> walks his"
        f" dog<|det|>[[320, 700, 450, 900]]<|/det|> past a tree<|det|>[[600, 0, 900, 800]]<|/det|>."
    )
    result = parse_grounding(caption)
    assert [(obj.label, obj.boxes) for obj in result.objects] == [
        ("man", [Box(100, 200, 300, 900)]),
        (None, [Box(320, 700, 450, 900)]),
        (None, [Box(600, 0, 900, 800)]),
    ]
    assert result.problems == []
    # outside a grounded caption the same unlabelled det is kept but reported
    result = parse_grounding(caption.replace(GROUNDING, ""))
    assert len(result.objects) == 3
    only_problem_matching(result, "[[320, 700, 450, 900]]", "[[600, 0, 900, 800]]")


def test_plain_answer_has_nothing():
    assert parse_grounding("The image shows a bar chart.") == GroundingResult([], [])
    assert parse_grounding("") == GroundingResult([], [])


# ---- malformed answers: repaired or skipped, always reported ---------------------------------------

MALFORMED = [
    # (answer, boxes of each object, problem fragments)
    ("<|ref|>car<|/ref|><|det|>[[2, 311, 99999, 98]]<|/det|>", [[Box(2, 98, 999, 311)]],
     ["over 999", "swapped"]),
    ("<|ref|>car<|/ref|><|det|>[[-15, 20, 30, -1]]<|/det|>", [[Box(0, 0, 30, 20)]], ["negative", "swapped"]),
    ("<|ref|>car<|/ref|><|det|>[[10.4, 20.6, 30, 40]]<|/det|>", [[Box(10, 21, 30, 40)]], ["rounded"]),
    ("<|ref|>car<|/ref|><|det|>[[1, 2, " + "9" * 5000 + ", 4]]<|/det|>", [[Box(1, 2, 999, 4)]], ["over 999"]),
    ("<|ref|>car<|/ref|><|det|>[[1, 2, 3]]<|/det|>", [], ["3 numbers"]),
    ("<|ref|>car<|/ref|><|det|>[[1, 2, 3, 4, 5], [5, 6, 7, 8]]<|/det|>", [[Box(5, 6, 7, 8)]], ["5 numbers"]),
    ("<|ref|>car<|/ref|><|det|>[[[1, 2, 3, 4]], [[5, 6, 7, 8]]]<|/det|>", [[Box(1, 2, 3, 4), Box(5, 6, 7, 8)]],
     ["nested deeper"]),
    ("<|ref|>car<|/ref|><|det|>[1, 2, 3, 4]<|/det|>", [[Box(1, 2, 3, 4)]], ["without the outer list"]),
    ("<|ref|>car<|/ref|><|det|>1, 2, 3, 4<|/det|>", [[Box(1, 2, 3, 4)]], ["without brackets"]),
    ("<|ref|>car<|/ref|><|det|>[[1, 2, 3, 4], 7]<|/det|>", [[Box(1, 2, 3, 4)]], ["stray numbers 7"]),
    ("<|ref|>car<|/ref|><|det|>[[1, 2, 3, 4]<|/det|>", [[Box(1, 2, 3, 4)]], ["unbalanced"]),
    ("<|ref|>car<|/ref|><|det|>[[1, 2, 3, 4]]]<|/det|>", [[Box(1, 2, 3, 4)]], ["unbalanced"]),
    ("<|ref|>car<|/ref|><|det|>[[1, 2, 3, 4]]", [[Box(1, 2, 3, 4)]], ["not closed before the end"]),
    ("<|ref|>car<|/ref|><|det|>[[1, 2, 3, 4]] is red.", [[Box(1, 2, 3, 4)]], ["not closed"]),
    ("<|ref|>car<|det|>[[1, 2, 3, 4]]<|/det|>", [[Box(1, 2, 3, 4)]], ["<|ref|>car is not closed"]),
    ("<|ref|>car<|/ref|> is parked.", [], ["no <|det|> boxes"]),
    ("<|ref|>car", [], ["not closed", "no <|det|> boxes"]),
    ("<|ref|>car<|/ref|><|det|><|/det|>", [], ["empty <|det|>"]),
    ("<|ref|>car<|/ref|><|det|>[[]]<|/det|>", [], ["empty <|det|>"]),
    ("<|ref|> <|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>", [[Box(1, 2, 3, 4)]], ["empty <|ref|> label"]),
    ("the car<|/ref|> is red<|/det|>", [], ["stray <|/ref|>", "stray <|/det|>"]),
    ("<|ref|>car<|/ref|><|det|>[[__import__('os').system('x')]]<|/det|>", [], ["not a list of numbers"]),
    ("<|ref|>car<|/ref|><|det|>[[1e3, 2, 3, 4]]<|/det|>", [], ["not a list of numbers"]),
    ("<|ref|>car<|/ref|><|det|>" + "[" * 100_000 + "1, 2, 3, 4" + "]" * 100_000 + "<|/det|>",
     [[Box(1, 2, 3, 4)]], ["nested deeper"]),
]


@pytest.mark.parametrize(("answer", "boxes", "fragments"), MALFORMED, ids=lambda value: repr(value)[:40])
def test_malformed_answers_are_tolerated_and_reported(answer, boxes, fragments):
    result = parse_grounding(answer)
    assert [obj.boxes for obj in result.objects] == boxes
    only_problem_matching(result, *fragments)


def test_unlabelled_box_with_empty_label_keeps_none():
    result = parse_grounding("<|ref|><|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>")
    assert result.objects == [GroundedObject(None, [Box(1, 2, 3, 4)])]


def test_python_expression_is_never_evaluated(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("model output must not be evaluated")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(ast, "literal_eval", forbidden)
    monkeypatch.setattr(os, "system", forbidden)
    answer = "<|ref|>x<|/ref|><|det|>[__import__('os').system('touch pwned')]<|/det|>" + grounded("y", (1, 2, 3, 4))
    result = parse_grounding(answer)
    assert result.objects == [GroundedObject("y", [Box(1, 2, 3, 4)])]
    assert any("not a list of numbers" in problem for problem in result.problems)


def test_wrong_input_type():
    with pytest.raises(TypeError, match="str"):
        parse_grounding(b"<|ref|>x<|/ref|>")
    with pytest.raises(TypeError, match="str"):
        clean_answer(None)


# ---- boxes and pixel coordinates ------------------------------------------------------------------


def test_pixel_conversion():
    assert Box(0, 0, 999, 999).to_pixels(640, 480) == (0.0, 0.0, 640.0, 480.0)
    assert Box(100, 200, 300, 400).to_pixels(999, 1998) == (100.0, 400.0, 300.0, 800.0)
    assert Box(580, 270, 999, 900).to_pixels(1000, 500) == pytest.approx(
        (580 * 1000 / 999, 270 * 500 / 999, 1000.0, 900 * 500 / 999))
    obj = GroundedObject("a", [Box(0, 0, 999, 999), Box(333, 333, 666, 666)])
    assert obj.pixel_boxes(999, 333) == [(0.0, 0.0, 999.0, 333.0), (333.0, 111.0, 666.0, 222.0)]


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (float("nan"), 10), ("10", 10), (True, 10)])
def test_pixel_conversion_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match="width|height"):
        Box(1, 2, 3, 4).to_pixels(*size)


@pytest.mark.parametrize("corners", [(0, 0, 1000, 5), (-1, 0, 5, 5), (5, 0, 1, 5), (0, 5, 5, 1), (0.5, 0, 1, 1)])
def test_box_rejects_invalid_corners(corners):
    with pytest.raises(ValueError, match="Box"):
        Box(*corners)


# ---- JSON -----------------------------------------------------------------------------------------


def test_result_to_json_gives_grid_and_pixel_boxes_and_problems():
    answer = grounded("the red car", (100, 600, 370, 830), (0, 0, 999, 999)) + " and " + grounded(None, (1, 2, 3, 4))
    result = parse_grounding(answer + END_OF_SENTENCE)
    expected = {
        "boxes": [
            {
                "label": "the red car",
                "boxes_0_999": [[100, 600, 370, 830], [0, 0, 999, 999]],
                "boxes_pixels": [[100 * 800 / 999, 600 * 520 / 999, 370 * 800 / 999, 830 * 520 / 999],
                                 [0.0, 0.0, 800.0, 520.0]],
            },
            {"label": None, "boxes_0_999": [[1, 2, 3, 4]],
             "boxes_pixels": [[800 / 999, 1040 / 999, 2400 / 999, 2080 / 999]]},
        ],
        "grounding_problems": ["<|det|>[[1, 2, 3, 4]]<|/det|> has no <|ref|> label before it"],
    }  # fmt: skip
    assert result.to_json((800, 520)) == expected
    assert json.loads(json.dumps(result.to_json((800, 520)))) == expected
    for entry in expected["boxes"]:
        del entry["boxes_pixels"]
    assert result.to_json() == expected  # no image: grid boxes only
    assert GroundingResult().to_json((800, 520)) == {"boxes": [], "grounding_problems": []}


@pytest.mark.parametrize(("size", "error"), [((800,), TypeError), ("800x520", TypeError), (800, TypeError),
                                             ((0, 520), ValueError), ((800, None), ValueError)])
def test_result_to_json_rejects_a_bad_image_size(size, error):
    with pytest.raises(error, match="image_size|width|height"):
        parse_grounding(grounded("car", (1, 2, 3, 4))).to_json(size)


# ---- properties -----------------------------------------------------------------------------------

FRAGMENTS = st.one_of(
    st.sampled_from([REF_OPEN, REF_CLOSE, DET_OPEN, DET_CLOSE, GROUNDING, END_OF_SENTENCE, "<|", "|>",
                     "[", "]", "[[", "]]", ",", " ", "\n", "-", ".", "+", "0", "999", "1000", "-7", "3.5",
                     "1e9", "9" * 400, "__import__('os')", "nan", "inf"]),
    st.text(max_size=12),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(FRAGMENTS, max_size=40).map("".join))
def test_no_text_makes_the_parser_raise(text):
    result = parse_grounding(text)
    for obj in result.objects:
        assert obj.label is None or (isinstance(obj.label, str) and obj.label.strip() == obj.label != "")
        assert obj.boxes and all(isinstance(box, Box) for box in obj.boxes)  # Box checks its own range
    assert all(isinstance(problem, str) for problem in result.problems)
    assert isinstance(clean_answer(text), str)


PROSE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<"), max_size=20)
LABEL = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<"), min_size=1, max_size=20)
CORNER_PAIR = st.tuples(st.integers(0, 999), st.integers(0, 999)).map(sorted)
BOX = st.builds(lambda xs, ys: Box(xs[0], ys[0], xs[1], ys[1]), CORNER_PAIR, CORNER_PAIR)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(PROSE, LABEL.map(str.strip).filter(bool) | st.none(), st.lists(BOX, min_size=1, max_size=4)),
             max_size=5),
    PROSE,
    st.sampled_from([", ", ","]),
)
def test_well_formed_answers_round_trip(parts, tail, separator):
    caption_mode = any(label is None for _, label, _ in parts)
    answer, shown = GROUNDING if caption_mode else "", ""
    for prose, label, boxes in parts:
        det = separator.join(f"[{separator.join(map(str, (b.x1, b.y1, b.x2, b.y2)))}]" for b in boxes)
        ref = "" if label is None else f"{REF_OPEN}{label}{REF_CLOSE}"
        answer += f"{prose}{ref}{DET_OPEN}[{det}]{DET_CLOSE}"
        shown += prose + (label or "")
    answer += tail + END_OF_SENTENCE

    result = parse_grounding(answer)
    assert result.objects == [GroundedObject(label, boxes) for _, label, boxes in parts]
    assert result.problems == []
    assert clean_answer(answer) == (shown + tail).strip()


# ---- clean_answer ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "shown"),
    [
        ("<|ref|>The giraffe at the back.<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>", "The giraffe at the back."),
        ("Put it in the <|ref|>trash can<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|> by the door.<｜end▁of▁sentence｜>",
         "Put it in the trash can by the door."),
        ("<|grounding|>A <|ref|>man<|/ref|><|det|>[[1,2,3,4]]<|/det|> and a dog<|det|>[[5,6,7,8]]<|/det|>.",
         "A man and a dog."),
        ("<|ref|>car<|/ref|><|det|>[[__import__('os')]]<|/det|> is red", "car is red"),
        ("<|ref|>car<|/ref|><|det|>[[1, 2, 3, 4]] is red", "car is red"),
        ("<|ref|>car<|/ref|><|det|>[[1, 2, 3, 4], [5, 6", "car"),
        ("No grounding here: [1, 2] stays.", "No grounding here: [1, 2] stays."),
    ],
)
def test_clean_answer(answer, shown):
    assert clean_answer(answer) == shown


# ---- drawing --------------------------------------------------------------------------------------


def changed(before: Image.Image, after: Image.Image) -> Image.Image:
    return ImageChops.difference(before.convert("RGB"), after).convert("L").point(lambda v: 255 if v else 0)


def test_draw_marks_box_edges_and_label_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the font comes from Pillow, not from a path relative to the cwd
    image = Image.new("RGB", (400, 300), GREY)
    result = parse_grounding(grounded("mug", (250, 300, 750, 900)))
    x1, y1, x2, y2 = (round(v) for v in result.objects[0].pixel_boxes(400, 300)[0])
    assert (x1, y1, x2, y2) == (100, 90, 300, 270)

    drawn = draw_grounding(image, result)
    assert drawn.size == image.size and drawn.mode == "RGB"
    assert image.getpixel((x1, 180)) == GREY  # the input is untouched
    edge = drawn.getpixel((x1, 180))
    assert edge != GREY
    for point in [(x2, 180), (200, y1), (200, y2), (x1 + 1, 180)]:
        assert drawn.getpixel(point) == edge
    assert drawn.getpixel((x1 + 2, 180)) == GREY  # default width is 2 px at this size
    assert drawn.getpixel((200, 180)) == GREY  # inside the box stays visible

    left, top, right, bottom = changed(image, drawn).getbbox()
    assert (left, right, bottom) == (x1, x2 + 1, y2 + 1)
    assert y1 - 40 < top < y1  # the label tag sits just above the box
    tag = drawn.crop((x1, top, x1 + 20, y1))
    assert tag.getpixel((1, 1)) == edge  # filled with the box's colour
    assert len(tag.getcolors()) > 2  # and has text on it


def test_labels_at_the_image_border_stay_inside():
    image = Image.new("RGB", (200, 100), GREY)
    result = parse_grounding(grounded("a label much wider than the tiny box near the corner", (950, 0, 999, 50)))
    drawn = draw_grounding(image, result)
    left, top, right, bottom = changed(image, drawn).getbbox()
    assert top == 0 and right == 200 and left < 190  # moved left and inside, not cut off at the top


def test_colours_follow_labels():
    image = Image.new("RGB", (300, 300), GREY)
    result = parse_grounding(
        grounded("mug", (100, 500, 200, 600)) + grounded("apple", (400, 500, 500, 600))
        + grounded("mug", (700, 500, 800, 600))
    )
    drawn = draw_grounding(image, result)
    mug, apple, other_mug = (drawn.getpixel((round(x * 300 / 999), 165)) for x in (100, 400, 700))
    assert mug == other_mug != apple


def test_line_width_scales_with_image_size():
    def run_width(size: int) -> int:
        image = Image.new("RGB", (size, size), GREY)
        drawn = draw_grounding(image, [GroundedObject(None, [Box(100, 100, 900, 900)])])
        row = [drawn.getpixel((x, size // 2)) != GREY for x in range(size // 2)]
        return sum(row)

    assert run_width(300) == 2
    assert run_width(2000) == 10


def test_draw_accepts_object_lists_and_explicit_options():
    image = Image.new("RGB", (100, 100), GREY)
    drawn = draw_grounding(image, [GroundedObject("x", [Box(100, 400, 900, 900)])], line_width=5)
    assert all(drawn.getpixel((10 + dx, 70)) != GREY for dx in range(5))
    with pytest.raises(ValueError, match="line_width"):
        draw_grounding(image, [], line_width=0)
    with pytest.raises(TypeError, match="GroundedObject"):
        draw_grounding(image, [Box(1, 2, 3, 4)])
    with pytest.raises(TypeError, match="PIL"):
        draw_grounding("image.png", [])


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "1", "CMYK"])
def test_draw_converts_any_mode_to_rgb(mode):
    image = Image.new("RGB", (120, 80), (40, 160, 90)).convert(mode)
    drawn = draw_grounding(image, parse_grounding(grounded("thing", (200, 300, 800, 900))))
    assert drawn.mode == "RGB" and drawn.size == image.size
    assert image.mode == mode
    assert changed(image, drawn).getbbox() is not None


def test_multi_image_draws_on_the_last_by_default():
    images = [Image.new("RGB", (64, 48), colour) for colour in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    result = parse_grounding(grounded("cube", (100, 100, 600, 600)))

    out = draw_on_images(images, result)
    assert len(out) == 3 and out is not images
    assert out[0] is images[0] and out[1] is images[1]
    assert changed(images[2], out[2]).getbbox() is not None
    assert images[2].getpixel((6, 20)) == (0, 0, 200)  # inputs untouched

    out = draw_on_images(images, result, image_index=0)
    assert changed(images[0], out[0]).getbbox() is not None
    assert out[1] is images[1] and out[2] is images[2]


@pytest.mark.parametrize(("count", "index", "error"), [(0, -1, ValueError), (1, 1, ValueError), (1, -2, ValueError),
                                                        (1, "0", TypeError)])
def test_multi_image_rejects_bad_index(count, index, error):
    with pytest.raises(error, match="image"):
        draw_on_images([Image.new("RGB", (8, 8))] * count, GroundingResult(), image_index=index)


def test_overlays_are_annotated_copies_of_the_images_with_boxes():
    images = [Image.new("RGB", (64, 48), colour) for colour in ((200, 0, 0), (0, 0, 200))]
    result = parse_grounding(grounded("cube", (100, 100, 600, 600)))

    (last,) = overlays(images, result)
    assert changed(draw_grounding(images[1], result), last).getbbox() is None
    assert changed(images[1], last).getbbox() is not None and images[1].getpixel((6, 20)) == (0, 0, 200)
    (first,) = overlays(images, result.objects, image_index=0)
    assert changed(draw_grounding(images[0], result), first).getbbox() is None

    assert overlays(images, parse_grounding("No boxes here.")) == []
    assert overlays([], result) == []  # a text-only chat: nothing to draw on
    with pytest.raises(TypeError, match="GroundedObject"):
        overlays(images, ["cube"])


# ---- sample images --------------------------------------------------------------------------------

SAMPLES = ["chart.png", "document.png", "street.png", "shapes.png", "shelf.png"]


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_images_are_committed_and_small(name):
    path = REPO / "images" / name
    assert path.stat().st_size < 200 * 1024
    with Image.open(path) as image:
        assert image.mode == "RGB" and min(image.size) >= 384


def test_sample_images_are_reproducible(tmp_path):
    spec = importlib.util.spec_from_file_location("make_sample_images", REPO / "scripts" / "make_sample_images.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    written = generator.main(tmp_path)
    assert sorted(path.name for path in written) == sorted(SAMPLES)
    for path in written:
        with Image.open(path) as fresh, Image.open(REPO / "images" / path.name) as committed:
            assert fresh.size == committed.size
            # identical with the same Pillow; text antialiasing may shift slightly across versions
            assert max(ImageStat.Stat(ImageChops.difference(fresh, committed)).mean) < 1.0
