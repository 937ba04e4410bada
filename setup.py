"""bdjax: Blended Diffusion (Avrahami et al., CVPR 2022) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="bdjax",
    version="0.1.0",
    description="Blended Diffusion for text-driven editing of natural images, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["bdjax", "bdjax.*", "checkpoints_convert", "launch"]),
    package_data={"bdjax": ["data/*"]},
    install_requires=[
        "jax",
        "flax",
        "numpy",
        "pillow",
        "absl-py",
        "safetensors",
        "transformers",  # CLIP's tokenizer
        "ftfy",  # the text clean-up of CLIP's tokenizer, as the reference's
        "tqdm",
    ],
    extras_require={
        "cuda": ["jax[cuda12]"],
        "cuda13": ["jax[cuda13]"],
        "tpu": ["jax[tpu]"],  # also what bench.compile_report needs on a machine without TPUs
        "convert": ["torch", "lpips"],  # lpips ships the v0.1 linear heads the LPIPS converter reads
        "app": ["gradio>=6,<7"],  # the web app (python -m launch.app)
        "test": [
            "pytest",
            "jax[tpu]",  # libtpu: the compile report's test compiles for TPU chips without TPUs
            "jax[cuda12]",  # JAX's CUDA plugin: the compile report's test compiles for an H200 without a GPU
            "torch",
            "torchvision",
            "guided-diffusion-sdk",
            # clip-anytorch imports pkg_resources, which setuptools 81 removed.
            "clip-anytorch",
            "setuptools<81",
            "lpips",
            "kornia",
            "gradio>=6,<7",  # the web app's tests
            "playwright",  # drives the system's Chromium in the web app's browser test
        ],
    },
)
