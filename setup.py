"""pip packaging: `pip install .` builds the op library with the Makefile's g++
rules against the TensorFlow of the installing interpreter, then ships it
inside the `monolith_tf` package."""

import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildOpsThenPy(build_py):
    def run(self):
        subprocess.check_call(["make", "-j2", "so", f"TF_PY={sys.executable}", "TF_FLAGS_DEPS="])
        super().run()


setup(
    name="monolith_tf",
    version="0.1.0",
    description="Collisionless embedding hash tables (ByteDance Monolith) for TensorFlow and Keras 3",
    packages=find_packages(include=["monolith_tf", "monolith_tf.*"]),
    package_data={"monolith_tf": ["_monolith_ops.so", "_built_for_tensorflow.txt"]},
    python_requires=">=3.11,<3.12",
    install_requires=[
        "tensorflow==2.21.0",
        "tensorflow-serving-api==2.21.0",
        "numpy",
        "pandas",
        "absl-py",
        "grpcio",
    ],
    entry_points={"console_scripts": [
        "monolith-train=monolith_tf.train:run",
        "monolith-serve=monolith_tf.serving.__main__:run",
        "monolith-delta-export=monolith_tf.delta_export:run",
    ]},
    cmdclass={"build_py": BuildOpsThenPy},
    zip_safe=False,
)
