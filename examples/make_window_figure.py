"""Draw docs/window.png: how window mode edits a photo at its own size, on the smoke networks.

    python examples/make_window_figure.py [--output docs/window.png]

Panels: the photo with the edit window drawn, the mask, the model-size crop the model edits, and the
full-size result. The smoke networks are tiny random ones, so the edit itself is noise (and the figure
says so); what the figure shows is where the edit goes and that the rest of the photo is kept.
"""

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

from bdjax import outputs, smoke

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join(HERE, "..", "docs", "window.png"))
    args = parser.parse_args()

    editor = smoke.editor(with_lpips=False)
    photo = os.path.join(HERE, "coffee_scribble.png")
    mask = os.path.join(HERE, "coffee_scribble_mask.png")
    result = editor.edit(photo, mask, "a bunch of carrots", num_samples=1, seed=404, progress=False)
    box = result.framing["window"]["box"]

    framed = Image.fromarray(result.source).convert("RGB")
    ImageDraw.Draw(framed).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=(255, 0, 160), width=3)
    side = result.framing["window"]["side"]
    crop = np.asarray(Image.fromarray(result.crops[0]).resize((side, side), Image.NEAREST))
    captions = ["photo 480x320, edit window drawn", "mask", f"model's edit ({editor.image_size} px, shown at "
                f"{side} px)", "result: 480x320, only the masked region changed"]
    sheet = outputs.sheet([np.asarray(framed), result.mask, crop, result.images[0]], captions,
                          f"{smoke.LABEL}: window mode on the smoke networks", columns=2)
    outputs.save_png(os.path.abspath(args.output), sheet, {"kind": "figure", "label": smoke.LABEL,
                                                           "window": result.framing["window"]})
    print(os.path.abspath(args.output))


if __name__ == "__main__":
    main()
