from setuptools import find_packages, setup

setup(
    name="fractal-kernels",
    version="0.1.0",
    description="Triton kernels for FractalNet: drop-path-aware join and fused BatchNorm+ReLU",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fractal_kernels", "fractalnet"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.6",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "tqdm",
        "matplotlib",
        "scikit-learn",
    ],
    entry_points={"console_scripts": ["fractalnet=fractalnet.cli:console"]},
    extras_require={
        # numpy<2.4: the Triton 3.6 interpreter, which the CPU test suite runs, converts size-1
        # arrays with int(), which numpy 2.4 rejects.
        # expecttest: PyTorch's module_db (the BatchNorm2d parity tests) imports it.
        # hypothesis: the property-based tests (tests/test_properties.py); ruff: the lint make test runs.
        "test": ["pytest", "pytest-benchmark", "numpy<2.4", "expecttest", "hypothesis", "ruff"],
    },
)
