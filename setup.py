"""Install minipaligemma: `pip install torch==2.13.0` first, then `pip install -e ".[test]"`."""

from setuptools import find_packages, setup

setup(
    name="minipaligemma",
    version="0.1.0",
    description="A readable from-scratch PyTorch reimplementation of PaliGemma and PaliGemma 2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["minipaligemma", "minipaligemma.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "numpy",
        "einops",
        "sentencepiece",
        "pillow",
        "tqdm",
        "safetensors",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "transformers>=5", "protobuf", "nbmake"],
        "notebooks": ["jupyter", "matplotlib"],  # the course in notebooks/: `jupyter lab notebooks/`
    },
)
