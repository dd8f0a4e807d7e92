"""Draw the sample images in images/ with Pillow alone, so they are ours and reproducible.

    python scripts/make_sample_images.py [--out images]

chart.png (a bar chart), document.png (a text page), street.png (a street scene), shapes.png and
shelf.png (objects on a table and on a shelf: two views with shared object kinds, for grounding and
multi-image prompts).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

IMAGES_DIR = Path(__file__).resolve().parents[1] / "images"
BLACK, WHITE = (20, 20, 20), (255, 255, 255)


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def centred_text(draw: ImageDraw.ImageDraw, centre: tuple[float, float], text: str, size: int, fill=BLACK):
    draw.text(centre, text, font=font(size), fill=fill, anchor="mm")


def chart() -> Image.Image:
    """Bar chart: cups of coffee sold per weekday, with title, axis labels, ticks and value labels."""
    days = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
    cups = (42, 38, 45, 51, 67, 88, 74)
    image = Image.new("RGB", (720, 480), WHITE)
    draw = ImageDraw.Draw(image)
    centred_text(draw, (380, 30), "Cups of coffee sold per day, week 12", 24)
    left, right, top, bottom = 90, 690, 70, 400
    y_max = 100

    def y_of(value: float) -> float:
        return bottom - (bottom - top) * value / y_max

    for tick in range(0, y_max + 1, 20):
        y = y_of(tick)
        draw.line((left, y, right, y), fill=(225, 225, 225), width=1)
        draw.text((left - 10, y), str(tick), font=font(15), fill=BLACK, anchor="rm")
    slot = (right - left) / len(days)
    for index, (day, value) in enumerate(zip(days, cups)):
        x0 = left + index * slot + slot * 0.2
        x1 = left + (index + 1) * slot - slot * 0.2
        colour = (214, 96, 77) if value == max(cups) else (67, 147, 195)
        draw.rectangle((x0, y_of(value), x1, bottom), fill=colour)
        centred_text(draw, ((x0 + x1) / 2, y_of(value) - 12), str(value), 15)
        centred_text(draw, ((x0 + x1) / 2, bottom + 16), day, 16)
    draw.line((left, top, left, bottom), fill=BLACK, width=2)
    draw.line((left, bottom, right, bottom), fill=BLACK, width=2)
    centred_text(draw, ((left + right) / 2, 452), "Day of the week", 18)
    axis_title = Image.new("RGBA", (200, 30), (0, 0, 0, 0))
    ImageDraw.Draw(axis_title).text((100, 15), "Cups sold", font=font(18), fill=BLACK, anchor="mm")
    axis_title = axis_title.rotate(90, expand=True)
    image.paste(axis_title, (18, (top + bottom) // 2 - 100), axis_title)
    return image


DOCUMENT_PARAGRAPHS = (
    "The Riverside Community Library will move to its new building on Elm Street. The old "
    "branch on Mill Road closes on Friday, 14 March, and the new one opens on Monday, 24 March.",
    "During the move, books can be returned to the drop box outside the town hall. No late "
    "fees will be charged for items due between 14 and 24 March.",
    "The new building has a children's room, six study rooms that can be booked online, and "
    "a cafe on the ground floor. Opening hours are listed below.",
)
OPENING_HOURS = (
    ("Monday - Friday", "9:00 - 20:00"),
    ("Saturday", "10:00 - 17:00"),
    ("Sunday", "closed"),
)


def document() -> Image.Image:
    """A printed notice: heading, date line, three paragraphs and a small table of opening hours."""
    image = Image.new("RGB", (620, 800), (250, 249, 245))
    draw = ImageDraw.Draw(image)
    margin = 50
    draw.text((margin, 50), "Library Moving Notice", font=font(34), fill=(25, 45, 90))
    draw.line((margin, 100, 620 - margin, 100), fill=(25, 45, 90), width=3)
    draw.text((margin, 115), "Riverside Community Library  |  3 March 2025", font=font(16), fill=(90, 90, 90))
    y = 165
    for paragraph in DOCUMENT_PARAGRAPHS:
        for line in textwrap.wrap(paragraph, width=62):
            draw.text((margin, y), line, font=font(17), fill=BLACK)
            y += 26
        y += 18
    draw.text((margin, y), "Opening hours", font=font(22), fill=(25, 45, 90))
    y += 40
    for day, hours in OPENING_HOURS:
        draw.rectangle((margin, y, 620 - margin, y + 34), outline=(170, 170, 170))
        draw.text((margin + 12, y + 17), day, font=font(17), fill=BLACK, anchor="lm")
        draw.text((330, y + 17), hours, font=font(17), fill=BLACK, anchor="lm")
        y += 34
    draw.text((margin, 740), "Questions? Ask at the front desk or call 555-0142.", font=font(15), fill=(90, 90, 90))
    return image


def car(draw: ImageDraw.ImageDraw, x: int, y: int, body: tuple[int, int, int], facing_right: bool = True):
    """A side-view car 200 px long whose wheels touch y."""
    draw.rounded_rectangle((x, y - 70, x + 200, y - 20), radius=14, fill=body)
    cabin = (x + 45, y - 110, x + 150, y - 68) if facing_right else (x + 50, y - 110, x + 155, y - 68)
    draw.rounded_rectangle(cabin, radius=16, fill=body)
    draw.rectangle((cabin[0] + 10, cabin[1] + 8, cabin[0] + 50, y - 70), fill=(170, 210, 235))
    draw.rectangle((cabin[0] + 56, cabin[1] + 8, cabin[2] - 10, y - 70), fill=(170, 210, 235))
    light_x = x + 188 if facing_right else x + 2
    draw.rectangle((light_x, y - 60, light_x + 10, y - 50), fill=(255, 230, 120))
    for wheel_x in (x + 45, x + 155):
        draw.ellipse((wheel_x - 22, y - 44, wheel_x + 22, y), fill=(30, 30, 30))
        draw.ellipse((wheel_x - 9, y - 31, wheel_x + 9, y - 13), fill=(160, 160, 160))


def tree(draw: ImageDraw.ImageDraw, x: int, ground: int, height: int):
    draw.rectangle((x - 8, ground - height // 2, x + 8, ground), fill=(110, 75, 45))
    radius = height // 3
    for dx, dy in ((-radius // 2, -height // 2), (radius // 2, -height // 2), (0, -height + radius)):
        draw.ellipse((x + dx - radius, ground + dy - radius, x + dx + radius, ground + dy + radius),
                     fill=(58, 135, 68))


def street() -> Image.Image:
    """A street: buildings, pavement, road with lane marks, two cars, a traffic light, a person,
    a street sign that reads MAIN ST and trees."""
    image = Image.new("RGB", (800, 520), (160, 205, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse((680, 30, 740, 90), fill=(255, 220, 90))
    for x0, width, height, colour in ((0, 170, 230, (196, 150, 120)), (180, 140, 280, (150, 160, 175)),
                                      (330, 200, 200, (210, 190, 150)), (540, 260, 250, (170, 120, 110))):
        top = 330 - height
        draw.rectangle((x0, top, x0 + width, 330), fill=colour)
        for wy in range(top + 20, 300, 50):
            for wx in range(x0 + 18, x0 + width - 30, 45):
                draw.rectangle((wx, wy, wx + 24, wy + 30), fill=(235, 240, 200))
    draw.rectangle((0, 330, 800, 370), fill=(190, 190, 185))  # pavement
    draw.rectangle((0, 370, 800, 520), fill=(75, 75, 80))  # road
    for x in range(0, 800, 90):
        draw.rectangle((x, 440, x + 50, 448), fill=(245, 245, 245))
    tree(draw, 60, 345, 120)
    tree(draw, 470, 345, 110)
    # traffic light
    draw.rectangle((703, 190, 711, 360), fill=(60, 60, 60))
    draw.rounded_rectangle((688, 110, 726, 200), radius=6, fill=(35, 35, 35))
    for index, lit in enumerate(((230, 40, 40), (90, 80, 30), (30, 80, 40))):
        draw.ellipse((697, 117 + index * 27, 717, 137 + index * 27), fill=lit)
    # street sign
    draw.rectangle((281, 230, 287, 362), fill=(90, 90, 90))
    draw.rectangle((234, 200, 334, 236), fill=(30, 120, 70), outline=WHITE, width=2)
    centred_text(draw, (284, 218), "MAIN ST", 18, fill=WHITE)
    # person
    skin, shirt, trousers = (230, 185, 150), (200, 60, 60), (40, 50, 90)
    draw.ellipse((583, 255, 603, 277), fill=skin)
    draw.rounded_rectangle((580, 278, 606, 318), radius=6, fill=shirt)
    draw.line((582, 284, 572, 312), fill=shirt, width=7)
    draw.line((604, 284, 614, 312), fill=shirt, width=7)
    draw.line((587, 316, 583, 358), fill=trousers, width=9)
    draw.line((599, 316, 604, 358), fill=trousers, width=9)
    car(draw, 90, 432, (200, 40, 40))
    car(draw, 470, 505, (40, 90, 180), facing_right=False)
    return image


def table_background(size: tuple[int, int], table_top: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", size, (232, 226, 214))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, table_top, size[0], size[1]), fill=(160, 112, 70))
    draw.line((0, table_top, size[0], table_top), fill=(120, 80, 50), width=4)
    return image, draw


def apple(draw: ImageDraw.ImageDraw, cx: int, bottom: int, r: int = 38, colour=(205, 35, 40)):
    draw.ellipse((cx - r, bottom - 2 * r, cx + r, bottom), fill=colour)
    draw.line((cx, bottom - 2 * r + 4, cx + 4, bottom - 2 * r - 14), fill=(90, 60, 30), width=4)
    draw.ellipse((cx + 6, bottom - 2 * r - 16, cx + 28, bottom - 2 * r - 4), fill=(70, 150, 60))


def mug(draw: ImageDraw.ImageDraw, x: int, bottom: int, colour, height: int = 90, width: int = 70):
    draw.ellipse((x + width - 18, bottom - height + 18, x + width + 24, bottom - 22), outline=colour, width=9)
    draw.rounded_rectangle((x, bottom - height, x + width, bottom), radius=8, fill=colour)


def book(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], colour, title: str | None = None):
    draw.rectangle(box, fill=colour, outline=(40, 40, 40), width=2)
    if title:
        x0, y0, x1, y1 = box
        centred_text(draw, ((x0 + x1) / 2, (y0 + y1) / 2), title, 14, fill=WHITE)


def shapes() -> Image.Image:
    """Objects on a table: a red apple, a blue mug, a banana, a green book, a bottle and an orange."""
    image, draw = table_background((720, 480), 300)
    apple(draw, 110, 400)
    mug(draw, 200, 395, (40, 90, 190))
    draw.ellipse((340, 330, 510, 420), fill=(240, 205, 50))  # banana: a crescent cut by the table colour
    draw.ellipse((336, 312, 514, 398), fill=(160, 112, 70))
    draw.polygon(((340, 368), (332, 352), (340, 348), (348, 366)), fill=(90, 70, 30))
    book(draw, (520, 350, 680, 440), (40, 130, 70), "GARDENING")
    draw.rectangle((445, 180, 485, 340), fill=(120, 190, 170))  # bottle
    draw.rectangle((455, 150, 475, 182), fill=(120, 190, 170))
    draw.rectangle((453, 140, 477, 152), fill=(200, 60, 60))
    draw.ellipse((270, 390, 340, 460), fill=(245, 140, 30))  # orange
    return image


def shelf() -> Image.Image:
    """A bookshelf with books, two mugs and an apple: the same kinds of object as shapes.png."""
    image = Image.new("RGB", (720, 480), (225, 222, 230))
    draw = ImageDraw.Draw(image)
    wood = (150, 105, 65)
    draw.rectangle((60, 30, 660, 460), outline=wood, width=14)
    for shelf_y in (240, 450):
        draw.rectangle((60, shelf_y, 660, shelf_y + 12), fill=wood)
    x = 90
    for width, height, colour in ((34, 170, (180, 50, 50)), (28, 150, (40, 80, 160)), (40, 185, (220, 170, 40)),
                                  (30, 160, (60, 140, 80)), (36, 175, (120, 60, 150))):
        book(draw, (x, 240 - height, x + width, 240), colour)
        x += width + 4
    mug(draw, 330, 240, (40, 150, 150))
    mug(draw, 480, 240, (230, 120, 40), height=80, width=64)
    apple(draw, 200, 450, r=42, colour=(120, 190, 60))
    for index, colour in enumerate(((70, 70, 160), (160, 70, 70), (60, 120, 60))):
        book(draw, (330, 450 - 30 * (index + 1), 560, 450 - 30 * index), colour)
    return image


SAMPLES = {"chart.png": chart, "document.png": document, "street.png": street, "shapes.png": shapes,
           "shelf.png": shelf}


def main(out_dir: Path = IMAGES_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in SAMPLES.items():
        path = out_dir / name
        make().save(path, optimize=True)
        written.append(path)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=IMAGES_DIR, help="folder to write the images to")
    for path in main(parser.parse_args().out):
        print(f"{path} ({path.stat().st_size // 1024} KB)")
