"""What window mode costs on the host, next to sampling: decoding a photo, choosing and cutting
its window, and pasting one edit back, timed on a synthetic photo with a small mask.

    python -m bench.window_cost --width=6000 --height=4000 --mask=200 --model_size=256

Prints one JSON object: the median seconds of each stage over --repeats runs, the photo's bytes and
the peak traced allocation (tracemalloc) of one crop and paste.
"""

from __future__ import annotations

import io
import json
import statistics
import time
import tracemalloc

import numpy as np
from absl import app, flags

from bdjax import window
from bdjax.absl_flags import parse_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_integer("width", 6000, "Photo width in pixels.")
    flags.DEFINE_integer("height", 4000, "Photo height in pixels.")
    flags.DEFINE_integer("mask", 200, "Side of the square mask, in photo pixels, at the photo's centre.")
    flags.DEFINE_integer("model_size", 256, "The model's image size.")
    flags.DEFINE_integer("feather", window.DEFAULT_FEATHER, "Soft edge in photo pixels.")
    flags.DEFINE_integer("repeats", 5, "Timed runs of each stage (the median is reported).")


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv):
    from PIL import Image

    rng = np.random.default_rng(0)
    photo_rgb = rng.integers(0, 256, (FLAGS.height, FLAGS.width, 3), dtype=np.uint8)
    mask = np.zeros((FLAGS.height, FLAGS.width), np.uint8)
    top, left = (FLAGS.height - FLAGS.mask) // 2, (FLAGS.width - FLAGS.mask) // 2
    mask[top:top + FLAGS.mask, left:left + FLAGS.mask] = 255
    png = io.BytesIO()
    Image.fromarray(photo_rgb).save(png, format="PNG", compress_level=1)

    decode_s, photo = timed(lambda: window.decode(Image.open(io.BytesIO(png.getvalue())), mask), FLAGS.repeats)
    choose_s, win = timed(lambda: window.choose(photo.mask, model_size=FLAGS.model_size), FLAGS.repeats)
    crop_s, (source, _) = timed(lambda: window.crop(photo, win, FLAGS.model_size), FLAGS.repeats)
    edit = 255 - source
    paste_s, _ = timed(lambda: window.paste(photo, win, edit, feather=FLAGS.feather), FLAGS.repeats)
    tracemalloc.start()
    window.paste(photo, win, window.crop(photo, win, FLAGS.model_size)[0], feather=FLAGS.feather)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({
        "photo": [FLAGS.width, FLAGS.height], "mask": FLAGS.mask, "model_size": FLAGS.model_size,
        "window": win.as_dict(), "photo_bytes": int(photo_rgb.nbytes),
        "median_s": {"decode_png": round(decode_s, 4), "choose": round(choose_s, 4), "crop": round(crop_s, 4),
                     "paste_per_sample": round(paste_s, 4)},
        "peak_traced_bytes_crop_and_paste": int(peak),
    }, indent=1))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
