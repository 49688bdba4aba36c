"""Builds the Cython fast path and generates the protobuf/gRPC modules from proto/.

Generated modules land in yikatong/v1/ (git-ignored) before the packages are collected, so
`pip install .` and `pip install -e .` both ship them. YIKATONG_DEBUG_BUILD=1 keeps asserts
and line tracing in the extension.
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def generate_protos() -> None:
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(glob.glob(os.path.join(HERE, "proto", "yikatong", "v1", "*.proto")))
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = ["protoc", f"-I{os.path.join(HERE, 'proto')}", f"-I{well_known}",
            f"--python_out={HERE}", f"--pyi_out={HERE}", f"--grpc_python_out={HERE}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on " + " ".join(protos))


generate_protos()

debug = bool(os.environ.get("YIKATONG_DEBUG_BUILD"))
extensions = [
    Extension(
        "fastpath._authorize_c",
        ["fastpath/_authorize_c.pyx"],
        define_macros=[("CYTHON_TRACE_NOGIL", "1")] if debug else [],
        extra_compile_args=["-O0", "-g"] if debug else ["-O3"],
        undef_macros=["NDEBUG"] if debug else [],
    )
]

setup(
    packages=find_packages(include=["yikatong", "yikatong.*", "server", "fastpath", "storage"]),
    package_data={"fastpath": ["*.pyx"], "yikatong.v1": ["*.pyi"]},
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": 3, "linetrace": debug, "binding": debug},
    ),
)
