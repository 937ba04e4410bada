"""Convert OpenAI CLIP weights (ViT image tower) to bdjax's safetensors format.

    python -m checkpoints_convert.clip --input=ViT-B-16.pt --output=DIR [--overwrite]
    python -m checkpoints_convert.clip --input=clip-vit-base-patch16/ --output=DIR [--overwrite]

`--input` is either OpenAI's released file (a TorchScript archive, or a plain
state dict read with `torch.load(weights_only=True)`) or a Hugging Face
`CLIPModel` directory holding `model.safetensors` and `config.json` (read
without torch or pickle). Loading a TorchScript archive runs code stored in
it: prefer the Hugging Face directory for files from untrusted sources.

The architecture is read off the weights (the input resolution, 224 for ViT-B/16 and
336 for ViT-L/14@336px, from the positional embedding's length times the patch size,
checked against the size the file declares), the parameters are checked key by key
and shape by shape against the Flax module, and only then are DIR/clip.safetensors
and DIR/clip.json written.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from bdjax import checkpoint
from bdjax.models import clip
from checkpoints_convert.common import (ConversionError, cli, conv_kernel, dense_kernel, is_torchscript_archive,
                                        module_path, out_of_memory, read_json_object, read_torch_state_dict)

# Scalars stored next to the weights in OpenAI's archives; OpenAI's build_model drops them too.
OPENAI_METADATA = {"input_resolution": "image_resolution", "context_length": "context_length",
                   "vocab_size": "vocab_size"}


# ---- reading ------------------------------------------------------------------------------

def read_openai(path: str) -> dict[str, np.ndarray]:
    """OpenAI's ViT-B-16.pt (TorchScript) or a torch.save'd state dict -> numpy state dict."""
    if not is_torchscript_archive(path):
        return read_torch_state_dict(path)
    import torch

    try:
        # Runs the archive's code: see the module docstring.
        state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    except MemoryError:
        raise out_of_memory(path) from None
    except Exception as e:  # torch raises many types for damaged archives
        message = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConversionError(f"{path} is not a readable TorchScript archive: {message[:200]}") from None
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).numpy()
            for k, v in state_dict.items()}


def read_hf(directory: str) -> tuple[dict[str, np.ndarray], dict]:
    """A Hugging Face CLIPModel directory -> (numpy state dict, config.json)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    weights, config_path = (os.path.join(directory, n) for n in ("model.safetensors", "config.json"))
    for p in (weights, config_path):
        if not os.path.isfile(p):
            raise ConversionError(f"{directory} is not a Hugging Face CLIPModel directory: {p} is missing "
                                  "(only model.safetensors is read, never pickled .bin files)")
    try:
        state_dict = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{weights} is not a readable safetensors file (truncated?): {e}") from None
    config = read_json_object(config_path, "a CLIPModel config object", "download the directory again")
    return {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in state_dict.items()}, config


# ---- Hugging Face layout -> OpenAI layout ---------------------------------------------------

_HF_RENAMES = [  # (Hugging Face prefix, OpenAI prefix), first match wins
    ("text_model.embeddings.token_embedding.", "token_embedding."),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("text_model.final_layer_norm.", "ln_final."),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.patch_embedding.", "visual.conv1."),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.", "visual.ln_pre."),  # sic: Hugging Face's spelling
    ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
    ("vision_model.post_layernorm.", "visual.ln_post."),
]
_HF_BLOCK_RENAMES = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1",
                     "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def hf_to_openai(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename Hugging Face keys to OpenAI's; q/k/v are packed into in_proj, projections transposed.

    Keys this mapping does not know are kept as they are, so validation names them.
    """
    out, qkv = {}, {}
    for key, value in state_dict.items():
        if key.endswith("embeddings.position_ids"):
            continue  # an index buffer some exports store, not a weight
        if key in ("visual_projection.weight", "text_projection.weight"):
            # Linear(width -> embed) without bias; OpenAI stores the (width, embed) matrix.
            out["visual.proj" if key.startswith("visual") else "text_projection"] = value.T
            continue
        new = key
        for hf, openai in _HF_RENAMES:
            if key.startswith(hf):
                new = openai + key[len(hf):]
                break
        if ".resblocks." in new:
            for hf, openai in _HF_BLOCK_RENAMES.items():
                new = new.replace(f".{hf}.", f".{openai}.")
            head, sep, leaf = new.partition(".self_attn.")
            if sep:  # q_proj.weight -> collected, packed below in q, k, v order as torch does
                projection, _, kind = leaf.partition(".")
                qkv.setdefault((head, kind), {})[projection] = value
                continue
        out[new] = value
    for (head, kind), parts in qkv.items():
        if sorted(parts) != ["k_proj", "q_proj", "v_proj"]:
            out.update({f"{head}.self_attn.{p}.{kind}": v for p, v in parts.items()})
            continue
        packed = np.concatenate([parts["q_proj"], parts["k_proj"], parts["v_proj"]], axis=0)
        out[f"{head}.attn.in_proj_{kind}"] = packed
    return out


def hf_architecture(config: dict) -> None:
    """Refuse Hugging Face configs whose maths differ from OpenAI CLIP's."""
    for tower in ("text_config", "vision_config"):
        sub = config.get(tower, {})
        act, eps = sub.get("hidden_act", "quick_gelu"), sub.get("layer_norm_eps", 1e-5)
        if act != "quick_gelu" or eps != 1e-5:
            raise ConversionError(f"{tower} has hidden_act={act!r}, layer_norm_eps={eps}; "
                                  "OpenAI CLIP uses quick_gelu and 1e-5")


# ---- OpenAI layout -> Flax ----------------------------------------------------------------

def infer_config(state_dict: dict[str, np.ndarray], heads: tuple[int, int] | None = None) -> dict | None:
    """CLIP fields from OpenAI-layout weights (as OpenAI's build_model), or None if they are not
    there. `heads` = (vision, text) head counts; OpenAI's checkpoints imply width // 64."""
    needed = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection",
              "positional_embedding", "token_embedding.weight", "ln_final.weight"]
    if not all(k in state_dict for k in needed):
        return None

    def count_layers(prefix):
        return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})

    vision_width, _, patch, _ = state_dict["visual.conv1.weight"].shape
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state_dict["ln_final.weight"].shape[0]
    vision_heads, text_heads = heads or (vision_width // 64, text_width // 64)
    return dict(embed_dim=int(state_dict["text_projection"].shape[1]), image_resolution=int(grid * patch),
                vision_layers=count_layers("visual.transformer.resblocks."), vision_width=int(vision_width),
                vision_patch_size=int(patch), vision_heads=int(vision_heads),
                context_length=int(state_dict["positional_embedding"].shape[0]),
                vocab_size=int(state_dict["token_embedding.weight"].shape[0]),
                transformer_width=int(text_width), transformer_heads=int(text_heads),
                transformer_layers=count_layers("transformer.resblocks."))


def flax_key(torch_key: str, ndim: int) -> str:
    """`visual.transformer.resblocks.3.attn.in_proj_weight`
    -> `visual/transformer/resblocks_3/attn/in_proj/kernel`."""
    *modules, leaf = torch_key.split(".")
    merged = module_path(modules)
    if leaf.startswith("in_proj_"):  # MultiheadAttention keeps its packed projection as raw tensors
        merged.append("in_proj")
        leaf = leaf[len("in_proj_"):]
    if leaf == "weight":
        if merged[-1] == "token_embedding":
            leaf = "embedding"
        else:
            leaf = "scale" if ndim == 1 else "kernel"  # 1-D weights are LayerNorm's
    return checkpoint.SEP.join(merged + [leaf])


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenAI CLIP state dict (numpy) -> flat Flax params, before validation."""
    flat = {}
    for key, value in state_dict.items():
        new = flax_key(key, value.ndim)
        if new.endswith("/kernel"):
            value = conv_kernel(value) if value.ndim == 4 else dense_kernel(value)
        flat[new] = value
    return flat


def convert(input_path: str, output_dir: str, overwrite: bool = False) -> tuple[str, str]:
    """Read either format, infer the architecture, validate against `jax.eval_shape`, then write."""
    checkpoint.ensure_writable(output_dir, clip.CHECKPOINT_NAME, overwrite)
    if os.path.isdir(input_path):
        hf_state_dict, hf_config = read_hf(input_path)
        hf_architecture(hf_config)
        state_dict = hf_to_openai(hf_state_dict)
        heads = tuple(hf_config.get(tower, {}).get("num_attention_heads")
                      for tower in ("vision_config", "text_config"))
        config = infer_config(state_dict, heads if None not in heads else None)
        declared = hf_config.get("vision_config", {}).get("image_size")
        if config is not None and declared is not None and int(declared) != config["image_resolution"]:
            raise ConversionError(f"{input_path}: vision_config.image_size={declared} disagrees with the weights "
                                  f"(image_resolution={config['image_resolution']})")
    else:
        state_dict = read_openai(input_path)
        metadata = {k: state_dict.pop(k) for k in list(state_dict) if k in OPENAI_METADATA}
        config = infer_config(state_dict)
        for key, value in metadata.items():
            if config is not None and int(value) != config[OPENAI_METADATA[key]]:
                raise ConversionError(f"{input_path}: {key}={int(value)} disagrees with the weights "
                                      f"({OPENAI_METADATA[key]}={config[OPENAI_METADATA[key]]})")
    what = input_path
    if config is None:
        # Not recognisably CLIP: compare with the model we use, so the error lists the differences.
        config = clip.preset("vit_b16")
        what = f"{input_path} (no CLIP ViT architecture found; compared with vit_b16)"
    flat = convert_state_dict(state_dict)
    checkpoint.check_params(flat, clip.param_shapes(clip.CLIP(**config)), what=what)
    return checkpoint.save(output_dir, clip.CHECKPOINT_NAME, flat, config, model="clip",
                           source=os.path.basename(os.path.normpath(input_path)), overwrite=overwrite)


FLAGS = flags.FLAGS


def define_flags():
    # Defined only when run as a program: importing several converters in one process (the tests
    # do) would otherwise define --input and --output twice.
    flags.DEFINE_string("input", None, "OpenAI CLIP file (ViT-B-16.pt) or Hugging Face CLIPModel directory.")
    flags.DEFINE_string("output", None, "Directory for clip.safetensors and clip.json.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing converted checkpoint.")


@cli
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.input or not FLAGS.output:
        raise ConversionError("--input and --output are required")
    weights, meta = convert(FLAGS.input, FLAGS.output, FLAGS.overwrite)
    print(f"wrote {weights} and {meta}")


if __name__ == "__main__":
    from checkpoints_convert.common import run_program

    run_program(define_flags, main)
