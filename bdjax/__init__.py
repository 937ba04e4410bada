"""Blended Diffusion for text-driven editing of natural images, in JAX/Flax.

    from bdjax import BlendedDiffusion
    editor = BlendedDiffusion.from_pretrained("weights/")
    result = editor.edit("photo.png", "mask.png", "a red ball")
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that `import bdjax.checkpoint` (converters) does not build the whole editor.
    if name in ("BlendedDiffusion", "EditResult"):
        from bdjax import editor
        return getattr(editor, name)
    if name == "EditOptions":
        from bdjax.options import EditOptions
        return EditOptions
    raise AttributeError(f"module 'bdjax' has no attribute {name!r}")
