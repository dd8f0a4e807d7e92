"""Read, clean and draw the boxes in DeepSeek-VL2 grounding answers.

The model marks objects as ``<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>``, with
coordinates on a 0-999 grid relative to the image's width and height. In grounded captions (prompts
starting with ``<|grounding|>``) a ``<|det|>`` may also appear without a ``<|ref|>`` before it.

Model output is untrusted text: it is read by a small lexer that only knows numbers, brackets and
commas, never evaluated as code. Nothing the model writes makes the parser raise; every malformed
part is skipped (or repaired, for out-of-range and swapped coordinates) and described in
``GroundingResult.problems``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from .models.conversation import DET_CLOSE, DET_OPEN, GROUNDING, REF_CLOSE, REF_OPEN
from .models.conversation import EOS as END_OF_SENTENCE

GRID_MAX = 999
GROUNDED_IMAGE = -1  # index of the image the boxes are on: the model was trained to ground on the last one

_TAGS = (REF_OPEN, REF_CLOSE, DET_OPEN, DET_CLOSE, GROUNDING, END_OF_SENTENCE)
_TAG = re.compile("(" + "|".join(re.escape(tag) for tag in _TAGS) + ")")
_CLOSING = {REF_OPEN: REF_CLOSE, DET_OPEN: DET_CLOSE}
_OPENING = {REF_CLOSE: REF_OPEN, DET_CLOSE: DET_OPEN}
# What an unclosed <|det|> claims of the text after it: the coordinate-looking run, up to its last
# digit or bracket; anything after that is prose again.
_COORDINATE_RUN = re.compile(r"(?:[\d\s\[\],.+-]*[\d\]])?")
_COORDINATE_TOKEN = re.compile(r"[\[\],]|[+-]?\d+(?:\.\d+)?|\s+|.", re.DOTALL)
_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")
_PUNCTUATION = frozenset("[],")


@dataclass(frozen=True)
class Box:
    """One box on the model's 0-999 grid: x runs along the width, y along the height."""

    x1: int
    y1: int
    x2: int
    y2: int

    def __post_init__(self):
        for name in ("x1", "y1", "x2", "y2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= GRID_MAX:
                raise ValueError(f"Box.{name} must be an int in [0, {GRID_MAX}], got {value!r}")
        if self.x2 < self.x1 or self.y2 < self.y1:
            raise ValueError(f"Box corners out of order: {self}")

    def to_pixels(self, width: float, height: float) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2) in pixels of a width x height image: x * width / 999, y * height / 999."""
        _check_size(width, height)
        return (
            self.x1 * width / GRID_MAX,
            self.y1 * height / GRID_MAX,
            self.x2 * width / GRID_MAX,
            self.y2 * height / GRID_MAX,
        )


@dataclass(frozen=True)
class GroundedObject:
    """A referred object and its boxes; ``label`` is None for a ``<|det|>`` with no ``<|ref|>``."""

    label: str | None
    boxes: list[Box]

    def pixel_boxes(self, width: float, height: float) -> list[tuple[float, float, float, float]]:
        return [box.to_pixels(width, height) for box in self.boxes]

    def to_json(self, image_size: tuple[float, float] | None = None) -> dict:
        """``label`` and ``boxes_0_999``, plus ``boxes_pixels`` when the (width, height) of the image is given."""
        entry = {"label": self.label, "boxes_0_999": [[box.x1, box.y1, box.x2, box.y2] for box in self.boxes]}
        if image_size is not None:
            entry["boxes_pixels"] = [list(box) for box in self.pixel_boxes(*_checked_size_pair(image_size))]
        return entry


@dataclass
class GroundingResult:
    """Objects in the order the answer mentions them, and what was wrong with the rest."""

    objects: list[GroundedObject] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_json(self, image_size: tuple[float, float] | None = None) -> dict:
        """The result as JSON-ready ``boxes`` and ``grounding_problems`` (the CLI's ``--json`` keys).

        Boxes are in pixels too when ``image_size``, the (width, height) of the image they are on, is given.
        """
        return {
            "boxes": [obj.to_json(image_size) for obj in self.objects],
            "grounding_problems": list(self.problems),
        }


@dataclass(frozen=True)
class _Segment:
    kind: str  # "text", "ref" (a label) or "det" (a coordinate list)
    value: str


def parse_grounding(text: str) -> GroundingResult:
    """Find the grounded objects in a model answer; malformed parts end up in ``problems``."""
    if not isinstance(text, str):
        raise TypeError(f"parse_grounding expects a str, got {type(text).__name__}")
    result = GroundingResult()
    caption_mode = GROUNDING in text
    pending: _Segment | None = None  # a ref still waiting for its <|det|>

    def drop_pending():
        nonlocal pending
        if pending is not None:
            result.problems.append(f"{REF_OPEN}{_snippet(pending.value)}{REF_CLOSE} has no {DET_OPEN} boxes")
            pending = None

    for segment in _segments(text, result.problems):
        if segment.kind == "text":
            if segment.value.strip():
                drop_pending()
        elif segment.kind == "ref":
            drop_pending()
            pending = segment
        else:
            if pending is not None:
                label = pending.value.strip() or None
                if label is None:
                    result.problems.append(f"empty {REF_OPEN} label before {DET_OPEN}{_snippet(segment.value)}")
                pending = None
            else:
                label = None
                if not caption_mode:
                    result.problems.append(
                        f"{DET_OPEN}{_snippet(segment.value)}{DET_CLOSE} has no {REF_OPEN} label before it"
                    )
            boxes = _parse_boxes(segment.value, result.problems)
            if boxes:
                result.objects.append(GroundedObject(label, boxes))
    drop_pending()
    return result


def clean_answer(text: str) -> str:
    """The answer for display: grounding tags, coordinate lists and end-of-sentence removed, labels kept."""
    if not isinstance(text, str):
        raise TypeError(f"clean_answer expects a str, got {type(text).__name__}")
    kept = (segment.value for segment in _segments(text, []) if segment.kind != "det")
    return "".join(kept).strip()


def _segments(text: str, problems: list[str]) -> Iterator[_Segment]:
    """Split text into prose, ref labels and det contents, tolerating missing or stray tags."""
    open_tag: str | None = None
    inside = ""
    pieces = _TAG.split(text)  # prose, tag, prose, tag, ..., prose
    for index, piece in enumerate(pieces):
        if index % 2 == 0:
            if open_tag is not None:
                inside += piece
            elif piece:
                yield _Segment("text", piece)
            continue
        if open_tag is not None:
            if piece == _CLOSING[open_tag]:
                yield _Segment("ref" if open_tag == REF_OPEN else "det", inside)
                open_tag = None
                continue
            problems.append(f"{open_tag}{_snippet(inside)} is not closed before {piece}")
            yield from _unclosed(open_tag, inside)
            open_tag = None
        if piece in _CLOSING:
            open_tag, inside = piece, ""
        elif piece in _OPENING:
            problems.append(f"stray {piece} without {_OPENING[piece]}")
    if open_tag is not None:
        problems.append(f"{open_tag}{_snippet(inside)} is not closed before the end of the answer")
        yield from _unclosed(open_tag, inside)


def _unclosed(open_tag: str, inside: str) -> Iterator[_Segment]:
    """An unclosed ref keeps all its text as label; an unclosed det only its coordinate-looking start."""
    if open_tag == REF_OPEN:
        yield _Segment("ref", inside)
        return
    coordinates = _COORDINATE_RUN.match(inside).group()
    yield _Segment("det", coordinates)
    if inside[len(coordinates):]:
        yield _Segment("text", inside[len(coordinates):])


def _parse_boxes(content: str, problems: list[str]) -> list[Box]:
    """Read ``[[x1, y1, x2, y2], ...]`` from a det's content without evaluating it."""
    where = f"{DET_OPEN}{_snippet(content)}{DET_CLOSE}"
    tokens = [token for token in _COORDINATE_TOKEN.findall(content) if not token.isspace()]
    if any(token not in _PUNCTUATION and not _NUMBER.fullmatch(token) for token in tokens):
        problems.append(f"{where} is not a list of numbers; skipped")
        return []

    root: list = []
    open_lists = [root]
    stray_closes = 0
    for token in tokens:
        if token == "[":
            child: list = []
            open_lists[-1].append(child)
            open_lists.append(child)
        elif token == "]":
            if len(open_lists) > 1:
                open_lists.pop()
            else:
                stray_closes += 1
        elif token != ",":
            open_lists[-1].append(token)
    if len(open_lists) > 1 or stray_closes:
        problems.append(f"{where} has unbalanced brackets")

    leaves = _number_lists(root, where, problems)
    if not leaves or all(not numbers for numbers, _ in leaves):
        problems.append(f"empty {where}")
        return []
    depths = {depth for _, depth in leaves}
    if 0 in depths:
        problems.append(f"{where} has numbers without brackets")
    if 1 in depths:
        problems.append(f"{where} has a box without the outer list")
    if max(depths) > 2:
        problems.append(f"{where} is nested deeper than [[x1, y1, x2, y2], ...]")

    boxes = []
    for numbers, _ in leaves:
        if len(numbers) != 4:
            problems.append(f"box [{', '.join(numbers)}] in {where} has {len(numbers)} numbers, not 4; skipped")
            continue
        boxes.append(_to_box(numbers, where, problems))
    return boxes


def _number_lists(root: list, where: str, problems: list[str]) -> list[tuple[list[str], int]]:
    """Lists holding only numbers, in order, with their bracket depth (iterative: nesting is unbounded)."""
    found = []
    stack = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        children = [item for item in node if isinstance(item, list)]
        numbers = [item for item in node if isinstance(item, str)]
        if not children:
            if numbers or depth:
                found.append((numbers, depth))
            continue
        if numbers:
            problems.append(f"stray numbers {', '.join(numbers)} beside boxes in {where}; ignored")
        stack.extend((child, depth + 1) for child in reversed(children))
    return found


def _to_box(numbers: list[str], where: str, problems: list[str]) -> Box:
    """Clip to the grid, round and order the corners, saying what had to be repaired."""
    shown = f"[{', '.join(numbers)}]"
    values = [float(number) for number in numbers]  # float: no digit-count limit, huge values become inf
    if any(value < 0 for value in values):
        problems.append(f"negative coordinate in {shown} of {where}; clipped to 0")
    if any(value > GRID_MAX for value in values):
        problems.append(f"coordinate over {GRID_MAX} in {shown} of {where}; clipped to {GRID_MAX}")
    clipped = [min(max(value, 0.0), float(GRID_MAX)) for value in values]
    if any(value != int(value) for value in clipped):
        problems.append(f"non-integer coordinate in {shown} of {where}; rounded")
    x1, y1, x2, y2 = (round(value) for value in clipped)
    if x2 < x1 or y2 < y1:
        problems.append(f"corners out of order in {shown} of {where}; swapped")
    return Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def _snippet(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _checked_size_pair(image_size: object) -> tuple[float, float]:
    if not isinstance(image_size, Sequence) or isinstance(image_size, str) or len(image_size) != 2:
        raise TypeError(f"image_size must be a (width, height) pair, got {image_size!r}")
    return image_size[0], image_size[1]


def _check_size(width: float, height: float):
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")


# Sasha Trubetskoy's distinct colours, most distinguishable first.
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
    (0, 0, 128),
)
_LABEL_CHARS = 48


def draw_grounding(
    image: Image.Image,
    objects: GroundingResult | Iterable[GroundedObject],
    *,
    line_width: int | None = None,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont | None = None,
) -> Image.Image:
    """An RGB copy of ``image`` with each object's boxes outlined and labelled.

    Objects with the same label share a colour; different labels get different colours (until the
    palette of 12 runs out). Line width and font size follow the image's shorter side unless given;
    the default font is Pillow's own, which has no CJK glyphs: pass ``font`` for such labels.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    objects = _object_list(objects)
    canvas = image.convert("RGB")  # a copy, as the model sees it (alpha dropped)
    width, height = canvas.size
    short_side = min(width, height)
    if line_width is None:
        line_width = max(2, round(short_side / 200))
    elif isinstance(line_width, bool) or not isinstance(line_width, int) or line_width < 1:
        raise ValueError(f"line_width must be a positive int, got {line_width!r}")
    if font is None:
        font = ImageFont.load_default(size=max(12, round(short_side / 28)))

    colours = _colours_by_label(objects)
    draw = ImageDraw.Draw(canvas)
    placed = [
        (obj, colour, _pixel_rect(box, width, height))
        for obj, colour in zip(objects, colours)
        for box in obj.pixel_boxes(width, height)
    ]
    for _, colour, rect in placed:
        draw.rectangle(rect, outline=colour, width=line_width)
    for obj, colour, rect in placed:  # labels last, so no later box crosses them
        if obj.label:
            _draw_label(draw, obj.label, rect, colour, font, pad=max(2, line_width), size=(width, height))
    return canvas


def draw_on_images(
    images: Sequence[Image.Image],
    result: GroundingResult | Iterable[GroundedObject],
    image_index: int = GROUNDED_IMAGE,
    **draw_options,
) -> list[Image.Image]:
    """The images with one replaced by its annotated copy: the last by default, as the model was trained
    to ground on the last image of a conversation; ``draw_options`` go to ``draw_grounding``."""
    images = list(images)
    if not images:
        raise ValueError("draw_on_images needs at least one image")
    if isinstance(image_index, bool) or not isinstance(image_index, int):
        raise TypeError(f"image_index must be an int, got {type(image_index).__name__}")
    if not -len(images) <= image_index < len(images):
        raise ValueError(f"image_index {image_index} is out of range for {len(images)} images")
    images[image_index] = draw_grounding(images[image_index], result, **draw_options)
    return images


def overlays(
    images: Sequence[Image.Image], result: GroundingResult | Iterable[GroundedObject], **draw_options
) -> list[Image.Image]:
    """Annotated copies of the images that have boxes: none for an answer without boxes or a chat without images.

    ``draw_options`` (``image_index`` included) go to ``draw_on_images``.
    """
    images, objects = list(images), _object_list(result)
    if not objects or not images:
        return []
    annotated = draw_on_images(images, objects, **draw_options)
    return [image for image, original in zip(annotated, images) if image is not original]


def _object_list(objects: GroundingResult | Iterable[GroundedObject]) -> list[GroundedObject]:
    objects = list(objects.objects if isinstance(objects, GroundingResult) else objects)
    if not all(isinstance(obj, GroundedObject) for obj in objects):
        raise TypeError("objects must be a GroundingResult or GroundedObject instances")
    return objects


def _colours_by_label(objects: list[GroundedObject]) -> list[tuple[int, int, int]]:
    """One colour per distinct label in order of appearance; each unlabelled object gets its own."""
    assigned: dict[object, tuple[int, int, int]] = {}
    colours = []
    for index, obj in enumerate(objects):
        key = obj.label if obj.label else ("unlabelled", index)
        if key not in assigned:
            assigned[key] = PALETTE[len(assigned) % len(PALETTE)]
        colours.append(assigned[key])
    return colours


def _pixel_rect(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """Whole pixels inside the image: grid 999 maps to the far edge, whose last pixel is size - 1."""
    x1, y1, x2, y2 = box
    return (
        min(round(x1), width - 1),
        min(round(y1), height - 1),
        min(round(x2), width - 1),
        min(round(y2), height - 1),
    )


def _draw_label(draw, label, rect, colour, font, *, pad, size):
    """The label on a filled tag above the box (inside it when there is no room), kept in the image."""
    if len(label) > _LABEL_CHARS:
        label = label[: _LABEL_CHARS - 3] + "..."
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    tag_width, tag_height = right - left + 2 * pad, bottom - top + 2 * pad
    width, height = size
    x = max(0, min(rect[0], width - tag_width))
    y = rect[1] - tag_height if rect[1] >= tag_height else rect[1]
    y = max(0, min(y, height - tag_height))
    draw.rectangle((x, y, x + tag_width - 1, y + tag_height - 1), fill=colour)
    red, green, blue = colour
    ink = (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 150 else (255, 255, 255)
    draw.text((x + pad - left, y + pad - top), label, font=font, fill=ink)
