"""Score edited images: python -m launch.evaluate --results=OUTPUT_DIR (a folder bdjax wrote)
or --jsonl=FILE (any tool's results), writing scores.json and scores.csv.

Every result gets the scores bdjax computes while it samples (bdjax/scores.py: clip_masked,
clip_whole, background_psnr, background_lpips, seam), each edit its diversity, the scores'
aggregates (mean, median, best) and the scores of the result the ranking (--rank_by) puts first,
the "best of N". Results are scored at the model size, in the window bdjax would edit (or the
stretched square with --fit=stretch), so that the scores mean what they mean in bdjax's reports.

--results=DIR reads DIR/report.json (launch.edit's, or a web app run's folder): the prompt, the
input photo and mask (the flags' paths, or the app's source.png and mask.png; --init_image and
--mask override them), the framing, and every ranked sample's model-size edit (crops/ in window
mode); its scores reproduce the report's.

--jsonl=FILE holds one edit per line: {"source": PATH, "mask": PATH, "prompt": TEXT, "results":
[PATH, ...]} ("result": PATH for one; optional "invert_mask" and "id"); relative paths are read
from the file's folder; blank lines and lines starting with '#' are skipped, and the file is bounded
as a batch manifest is (64 MiB, 100,000 lines, 1 MiB a line). A result of another size than its source is resized to it first (said in
its row). The window is chosen from the mask with --fit, --context (as bdjax chooses it).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys

from absl import app, flags
from tqdm.auto import tqdm

from launch import cli, runtime

FLAGS = flags.FLAGS
SCORES_JSON, SCORES_CSV = "scores.json", "scores.csv"
CSV_COLUMNS = ("edit", "file", "rank", "sample_id", "clip_masked", "clip_whole", "background_psnr",
               "background_lpips", "seam", "rank_value", "resized")


def define_flags():
    from bdjax.options import RANKING, EditOptions

    runtime.define_flags()
    cli.define_framing_flags()  # --fit, --context (--feather is not used: scores are at the model size)
    flags.adopt_module_key_flags(runtime)
    flags.adopt_module_key_flags(cli)
    for field in EditOptions.declaration():
        if field.name in RANKING:
            define = flags.DEFINE_string if field.type == "str" else flags.DEFINE_float
            define(field.name, field.default, field.metadata["help"])
    flags.DEFINE_string("results", None, "A folder bdjax wrote (launch.edit's --output_dir, or a web app run folder).")
    flags.DEFINE_string("jsonl", None, "A JSON-lines file of edits and their results (see the module's help).")
    flags.DEFINE_string("init_image", None, "--results: the input photo, if not where the report says.")
    flags.DEFINE_string("mask", None, "--results: the mask, if not where the report says.")
    flags.DEFINE_string("output_dir", None, "Where scores.json and scores.csv go; default: the --results folder, "
                        "or the --jsonl file's folder.")
    flags.DEFINE_bool("overwrite", False, "Replace scores.json and scores.csv already there.")


class Edit:
    """One edit to score: its inputs as prepared for the model (a `request.Inputs`), prompt, and
    results as model-size uint8 images with where they came from."""

    def __init__(self, name, inputs, prompt, images, files, sample_ids=None, resized=None):
        self.name, self.inputs, self.prompt, self.images, self.files = name, inputs, prompt, images, files
        self.sample_ids = sample_ids if sample_ids is not None else [None] * len(files)
        self.resized = resized if resized is not None else [False] * len(files)


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} not found: {what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e})") from None


def _png(path: str, what: str):
    """The image at `path` as RGB uint8; ValueError (one line) if it is missing or unreadable."""
    import numpy as np

    from bdjax import image_io

    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} not found")
    return np.asarray(image_io.to_pil(path, what).convert("RGB"))


def folder_edit(directory: str, size: int) -> Edit:
    """The edit a bdjax folder holds, read from its report.json."""
    import numpy as np

    from bdjax import outputs, request

    report = _read_json(os.path.join(directory, outputs.REPORT), "--results must be a folder bdjax wrote "
                        "(launch.edit's --output_dir or a web app run folder)")
    if not isinstance(report, dict) or not isinstance(report.get("samples"), list):
        raise ValueError(f"{os.path.join(directory, outputs.REPORT)} is not a bdjax report (no samples list)")
    given = report.get("flags") or {}
    app_inputs = report.get("inputs") or {}
    if "prompt" in app_inputs:  # a web app run: its inputs are beside the results, the mask as used
        prompt, invert = app_inputs["prompt"], False
        image, mask = os.path.join(directory, "source.png"), os.path.join(directory, "mask.png")
    else:
        prompt, invert = given.get("prompt"), bool(given.get("invert_mask", False))
        image, mask = given.get("init_image"), given.get("mask")
    image, mask = FLAGS.init_image or image, FLAGS.mask or mask
    if prompt is None or image is None:
        raise ValueError(f"{os.path.join(directory, outputs.REPORT)} does not say the prompt and input photo")
    for what, path in (("the input photo", image), ("the mask", mask)):
        if path is not None and not os.path.isfile(path):
            flag = "--init_image" if what == "the input photo" else "--mask"
            raise ValueError(f"{what} {path} (from the report) not found: pass {flag}=PATH")
    framing = {"fit": report.get("fit", "stretch")}
    if framing["fit"] == "window":
        framing.update(context=report["context"], feather=report["feather"])
    inputs = request.prepare_inputs(image, mask, invert_mask=invert, image_size=size, **framing)
    images, files, ids = [], [], []
    for sample in report["samples"]:
        k = int(sample["sample_id"])
        path = os.path.join(directory, outputs.CROPS_DIR, outputs.sample_name(k)) if framing["fit"] == "window" \
            else os.path.join(directory, sample["file"])
        images.append(_png(path, f"sample {k}'s model-size edit"))
        files.append(os.path.relpath(path, directory))
        ids.append(k)
    for path, image_ in zip(files, images):
        if image_.shape[:2] != (size, size):
            raise ValueError(f"{path} is {image_.shape[1]}x{image_.shape[0]}: the results were made at another model "
                             f"size than this run's networks ({size}x{size}); match --config / --model_output_size")
    return Edit(os.path.basename(os.path.abspath(directory)), inputs, prompt,
                np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8), files, ids)


def jsonl_edits(path: str, size: int) -> list[dict]:
    """The edits of a JSON-lines file, checked (every field, every file there and its image
    readable), as {name, source, mask, invert_mask, prompt, results, where}; ValueError naming the
    line for a bad one. Their images are decoded again, one edit at a time, by `load_edit`, so
    that memory holds one edit's images whatever the file's length."""
    from PIL import Image

    from bdjax import request
    from bdjax.batch.manifest import MAX_LINE_BYTES, manifest_lines

    base = os.path.dirname(os.path.abspath(path))
    resolve = lambda p: os.path.abspath(os.path.join(base, os.path.expanduser(p)))  # noqa: E731
    # Read as a batch manifest is: UTF-8 (a byte-order mark dropped), at most 64 MiB and 100,000
    # lines, blank and '#' lines skipped, each line at most 1 MiB.
    lines = manifest_lines(path, label=f"--jsonl={path}")
    framing = {"fit": FLAGS.fit, "context": FLAGS.context} if FLAGS.fit == "window" else {"fit": "stretch"}
    edits = []
    for number, text in enumerate(lines, 1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        where = f"{path} line {number}"
        if len(text.encode("utf-8")) > MAX_LINE_BYTES:
            raise ValueError(f"{where} is over {MAX_LINE_BYTES >> 20} MiB: an edit is one short JSON object")
        try:
            line = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not JSON ({e.msg})") from None
        if not isinstance(line, dict):
            raise ValueError(f"{where} must be a JSON object")
        results = line.get("results", [line["result"]] if "result" in line else None)
        missing = [k for k, v in (("source", line.get("source")), ("mask", line.get("mask")),
                                  ("prompt", line.get("prompt")), ("results", results)) if v is None]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(repr(m) for m in missing)} (needs source, mask, prompt and "
                             "results or result)")
        if not isinstance(line["prompt"], str) or not isinstance(results, list) or not results \
                or not all(isinstance(r, str) for r in results + [line["source"], line["mask"]]):
            raise ValueError(f"{where}: source, mask and prompt must be strings and results a non-empty list of paths")
        spec = {"name": str(line.get("id", f"line {number}")), "source": resolve(line["source"]),
                "mask": resolve(line["mask"]), "invert_mask": bool(line.get("invert_mask", False)),
                "prompt": line["prompt"], "results": [resolve(r) for r in results], "where": where}
        try:
            request.prepare_inputs(spec["source"], spec["mask"], invert_mask=spec["invert_mask"], image_size=size,
                                   **framing)
        except (ValueError, OSError) as e:
            raise ValueError(f"{where}: {e}") from None
        for result in spec["results"]:
            if not os.path.isfile(result):
                raise ValueError(f"{where}: result {result} not found")
            try:
                with Image.open(result) as im:
                    im.verify()
            except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for a file that is no image
                raise ValueError(f"{where}: result {result} is not a readable image ({e})") from None
        edits.append(spec)
    return edits


def load_edit(spec: dict, size: int) -> Edit:
    """A checked JSON-lines edit (`jsonl_edits`) decoded: its inputs framed as bdjax frames them,
    and each result cut to the same window (resized to the source's size first where it differs)."""
    import numpy as np
    from PIL import Image

    from bdjax import request

    framing = {"fit": FLAGS.fit, "context": FLAGS.context} if FLAGS.fit == "window" else {"fit": "stretch"}
    inputs = request.prepare_inputs(spec["source"], spec["mask"], invert_mask=spec["invert_mask"], image_size=size,
                                    **framing)
    full = inputs.full_source
    images, resized = [], []
    for result in spec["results"]:
        rgb = _png(result, f"{spec['where']}: result")
        resized.append(rgb.shape[:2] != full.shape[:2])
        if resized[-1]:
            rgb = np.asarray(Image.fromarray(rgb).resize((full.shape[1], full.shape[0]), Image.LANCZOS))
        # The result framed as its source is: the same window, cut and resized the same way.
        images.append(request.prepare_inputs(rgb, inputs.full_mask, image_size=size, **framing).source)
    return Edit(spec["name"], inputs, spec["prompt"], np.stack(images), spec["results"], resized=resized)


def evaluate(editor, edits, options) -> dict:
    """Every result's scores, ranked per edit by `options.rank_by`, with each edit's diversity,
    aggregates and best of N, and the aggregates over all results and over the edits' best.
    `edits` is an iterable of Edit, scored one at a time."""
    import numpy as np

    from bdjax import scores as scores_lib

    rows, summaries, tops = [], [], []
    for edit in edits:
        text = np.asarray(editor.encode_prompt(edit.prompt))
        scores = editor.score(edit.images, edit.inputs.init, edit.inputs.region, text)
        values = scores_lib.rank_values(scores, options)
        order = np.argsort(values, kind="stable")
        ranked = []
        for rank, i in enumerate(order):
            ranked.append({"edit": edit.name, "file": edit.files[i], "rank": rank, "sample_id": edit.sample_ids[i],
                           **scores_lib.row(scores, int(i)), "rank_value": scores_lib.plain(values[i]),
                           "resized": bool(edit.resized[i])})
        rows += ranked
        best = [edit.images[i] for i in order[:scores_lib.DIVERSITY_MAX]]
        diversity = editor.diversity(np.stack(best), edit.inputs.region) if len(best) > 1 else None
        top = {name: ranked[0][name] for name in scores_lib.NAMES} if ranked else None
        if top is not None:
            tops.append(top)
        summaries.append({"edit": edit.name, "prompt": edit.prompt, "results": len(ranked), "diversity": diversity,
                          "aggregates": scores_lib.aggregate(ranked), "best_of_n": top})
    return {"rank_by": options.rank_by, "edits": summaries, "results": rows,
            "aggregates": {"all_results": scores_lib.aggregate(rows), "best_of_n": scores_lib.aggregate(tops)}}


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
    return out.getvalue()


def main(argv):
    if len(argv) > 1:
        raise cli.FlagError(f"unexpected arguments: {argv[1:]}")
    if (FLAGS.results is None) == (FLAGS.jsonl is None):
        raise cli.FlagError("give one of --results=DIR (a folder bdjax wrote) and --jsonl=FILE (edits and results)")
    if FLAGS.results is not None and not os.path.isdir(FLAGS.results):
        raise cli.FlagError(f"--results={FLAGS.results} is not a folder")
    from bdjax.options import RANKING, EditOptions

    options = EditOptions(**{name: FLAGS[name].value for name in RANKING})
    options.validate()
    if (FLAGS.init_image or FLAGS.mask) and FLAGS.results is None:
        raise cli.FlagError("--init_image and --mask go with --results (a --jsonl line names its own)")
    directory = FLAGS.output_dir or (FLAGS.results if FLAGS.results is not None
                                     else os.path.dirname(os.path.abspath(FLAGS.jsonl)))
    targets = [os.path.join(directory, name) for name in (SCORES_JSON, SCORES_CSV)]
    there = [t for t in targets if os.path.exists(t)]
    if there and not FLAGS.overwrite:
        raise FileExistsError(f"{there[0]} already exists: pass --overwrite or another --output_dir")
    size = cli.model_size()
    # The inputs are read and checked before any network loads.
    if FLAGS.results is not None:
        edit = folder_edit(FLAGS.results, size)
        edits, count, number = [edit], len(edit.files), 1
    else:
        specs = jsonl_edits(FLAGS.jsonl, size)
        edits = (load_edit(s, size) for s in specs)  # decoded one at a time, as they are scored
        count, number = sum(len(s["results"]) for s in specs), len(specs)
    runtime.setup()
    from bdjax import outputs, smoke
    from bdjax.files import atomic_write

    editor = runtime.build_editor(True)
    label = smoke.LABEL if FLAGS.config == "smoke" else ""
    print(f"scoring {count} result{'s' * (count != 1)} of {number} edit{'s' * (number != 1)}", file=sys.stderr,
          flush=True)
    with tqdm(edits, total=number, desc="scoring", unit="edit", disable=number < 2) as bar:
        found = evaluate(editor, bar, options)
    found = {**found, "label": label or None, "config": FLAGS.config, "image_size": editor.image_size}
    os.makedirs(directory, exist_ok=True)
    outputs.save_json(targets[0], outputs.finite_or_none(found))

    def write_csv(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(csv_text(found["results"]))
    atomic_write(targets[1], write_csv)
    best = found["aggregates"]["best_of_n"].get(options.rank_by) if options.rank_by != "combined" else None
    line = f"{count} results scored; {targets[0]} and {targets[1]}"
    if best:
        line += f" (mean best-of-N {options.rank_by} {best['mean']:.4f})"
    print(line + (f"\n{label}" if label else ""))


if __name__ == "__main__":
    define_flags()
    app.run(cli.program(main), flags_parser=cli.parse_flags)
