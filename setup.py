"""knsparse: k:n / 2:4 semi-structured sparse inference for vision models."""

from setuptools import find_packages, setup

setup(
    name="knsparse",
    version="0.1.0",
    description="k:n (2:4) semi-structured sparse inference for vision models on NVIDIA sparse tensor cores",
    python_requires=">=3.10",
    package_dir={"knsparse": "python/knsparse", "knsparse.kernels": "kernels"},
    packages=["knsparse", "knsparse.kernels"] + [f"knsparse.{p}" for p in find_packages("python/knsparse")],
    install_requires=[
        "torch>=2.11",
        "triton",
        "numpy",
        "safetensors",
        "tqdm",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "ruff"],
        "timm": ["timm"],
    },
    entry_points={"console_scripts": ["knsparse=knsparse.cli:main"]},
)
