"""knsparse: k:n (2:4) semi-structured sparse inference for vision models.

The CUDA kernels are a separate, torch-independent shared library: `make cuda` builds
python/knsparse/ops/libknsparse_cuda.so (nvcc + the nvidia-cutlass headers, no GPU and no CUDA
build of PyTorch needed); a wheel built afterwards carries it, as it carries kernels/nmf_cpu.c
(compiled on first use). See csrc/README.md.
"""

from setuptools import find_packages, setup

setup(
    name="knsparse",
    version="0.1.0",
    description="k:n (2:4) semi-structured sparse inference for vision models on sparse tensor cores",
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
        "scipy",
    ],
    extras_require={
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "ruff==0.17.6"],
        "timm": ["timm"],
        "cuda": ["nvidia-cutlass==4.2.0.0"],  # the release csrc/ and its tests are checked against
        "bench": ["weightwatcher"],
    },
    package_data={"knsparse.ops": ["libknsparse_cuda.so"], "knsparse.kernels": ["*.c"]},
    entry_points={"console_scripts": ["knsparse=knsparse.cli:main"]},
)
