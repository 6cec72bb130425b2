import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "glide_text2im" / "__init__.py").read_text()).group(1)

setup(
    name="glide-text2im",
    version=VERSION,
    description="GLIDE (filtered) text-to-image diffusion: checkpoint-compatible models, fast samplers, pipelines and training",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["glide_text2im", "glide_text2im.*"]),
    package_data={
        "glide_text2im": [
            "clip/config.yaml",
            "tokenizer/data/*.gz",
            "demo/weights/*.safetensors",
            "demo/weights/*.json",
            "demo/weights/*.yaml",
        ],
    },
    install_requires=[
        "torch>=2.6",
        "numpy",
        "pillow",
        "ftfy",
        "regex",
        "tqdm",
        "requests",
        "blobfile",
        "filelock",
        "pyyaml",
        "safetensors",
    ],
    extras_require={
        # setuptools: tests/test_package.py builds the wheel without build isolation, which
        # needs a setuptools that has bdist_wheel built in (the one venv bundles does not).
        "test": ["pytest", "nbclient", "nbformat", "ipykernel", "setuptools>=70.1"],
    },
    entry_points={"console_scripts": ["glide-text2im=glide_text2im.cli:main"]},
)
