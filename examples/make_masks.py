"""Redraw the example masks and the scribble from the two photos in this folder.

    python examples/make_masks.py

The masks are hand-placed polygons (white = edit), not segmentations; they are as rough as a
user's would be. Polygons are written in the coordinates of scikit-image's originals (coffee
600x400, astronaut 512x512) and scaled to the shipped sizes (480x320, 384x384). Needs numpy and
Pillow only.
"""

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = os.path.dirname(os.path.abspath(__file__))


def polygon(points, scale, size, grow=0):
    """A filled polygon as an L-mode mask, dilated by `grow` pixels on each side."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).polygon([(x * scale, y * scale) for x, y in points], fill=255)
    return mask.filter(ImageFilter.MaxFilter(2 * grow + 1)) if grow else mask


def coffee_masks(coffee):
    size, scale = coffee.size, coffee.width / 600
    # The cup with its handle, a few pixels of margin: an object edit.
    cup = [(158, 60), (185, 25), (230, 8), (290, 2), (355, 8), (400, 30), (420, 70), (415, 140), (395, 215),
           (360, 270), (320, 290), (270, 300), (262, 318), (225, 318), (192, 305), (185, 260), (176, 215),
           (160, 150)]
    polygon(cup, scale, size, grow=2).save(os.path.join(HERE, "coffee_cup_mask.png"))
    # Cup, saucer and spoon together: removal (prompt the table that should be there instead).
    setting = [(70, 180), (90, 125), (150, 90), (175, 35), (230, 8), (290, 2), (355, 8), (400, 30), (415, 60),
               (430, 60), (440, 100), (475, 160), (490, 230), (475, 300), (430, 350), (360, 385), (280, 395),
               (200, 385), (130, 350), (90, 300), (70, 240)]
    polygon(setting, scale, size, grow=4).save(os.path.join(HERE, "coffee_removal_mask.png"))


def coffee_scribble(coffee):
    """Rough orange brush strokes and a green stalk on the table, and a mask around them."""
    rng = np.random.default_rng(7)
    scribble = coffee.copy()
    paint = Image.new("L", coffee.size, 0)
    draw_image, draw_mask = ImageDraw.Draw(scribble), ImageDraw.Draw(paint)
    cx, cy, r = 426, 96, 38  # in the 480x320 image

    def stroke(points, colour, width):
        for draw, fill in ((draw_image, colour), (draw_mask, 255)):
            draw.line(points, fill=fill, width=width, joint="curve")
            for x, y in (points[0], points[-1]):  # round brush ends
                draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=fill)

    for k in range(11):  # back-and-forth strokes over a rough disc
        y0 = cy - r + (k + 0.5) * 2 * r / 11
        points = []
        for t in np.linspace(-1, 1, 6):
            y = y0 + rng.normal(0, 2.5)
            half = np.sqrt(max(r * r - (y - cy) ** 2, 16))
            points.append((cx + t * half + rng.normal(0, 2), y))
        if k % 2:
            points = points[::-1]
        stroke(points, (236 + int(rng.integers(-8, 8)), 126 + int(rng.integers(-12, 12)), 26), 11)
    for k in range(3):  # a few diagonal strokes on top, the way people fill a shape
        a = rng.uniform(0.5, 1.0)
        stroke([(cx - r * 0.6 + k * 18, cy + r * 0.6), (cx - r * 0.2 + k * 18, cy - r * 0.6 * a)], (225, 118, 20), 9)
    stroke([(cx + 2, cy - r + 4), (cx + 6, cy - r - 10), (cx + 22, cy - r - 16)], (60, 150, 40), 6)
    scribble.save(os.path.join(HERE, "coffee_scribble.png"), optimize=True)
    paint.filter(ImageFilter.MaxFilter(21)).save(os.path.join(HERE, "coffee_scribble_mask.png"))


def astronaut_mask(astronaut):
    """The person and her helmet; with --invert_mask everything else (flag, shuttle model, backdrop) is edited."""
    subject = [(150, 40), (185, 15), (230, 10), (280, 22), (300, 50), (302, 95), (292, 122), (282, 145),
               (300, 172), (308, 205), (312, 238), (336, 255), (354, 275), (364, 305), (368, 345), (400, 336),
               (450, 343), (490, 368), (512, 398), (512, 512), (10, 512), (14, 400), (17, 330), (26, 285),
               (45, 250), (75, 225), (108, 195), (125, 170), (160, 150), (152, 110), (146, 70)]
    polygon(subject, astronaut.width / 512, astronaut.size).save(os.path.join(HERE, "astronaut_subject_mask.png"))


if __name__ == "__main__":
    coffee = Image.open(os.path.join(HERE, "coffee.png")).convert("RGB")
    coffee_masks(coffee)
    coffee_scribble(coffee)
    astronaut_mask(Image.open(os.path.join(HERE, "astronaut.png")).convert("RGB"))
