"""Builds Yikatong: one installable namespace, `yikatong`, whose subpackages sit where the
design puts them (`server/`, `storage/`, `fastpath/` map to `yikatong.server`, ...).

Code generation runs in command classes, never on import (uvloop's way), so an sdist is
self-contained and a wheel builds from it:
- `build_py` generates yikatong/v1/*_pb2*.py from proto/ with grpcio-tools (git-ignored);
- `build_ext` cythonizes fastpath/_authorize_c.pyx. YIKATONG_DEBUG_BUILD=1 keeps asserts and
  line tracing in the extension.
Both also run in editable installs (`pip install -e .`).
"""
import glob
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext
from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = bool(os.environ.get("YIKATONG_DEBUG_BUILD"))


class build_py(_build_py):
    def run(self):
        import grpc_tools
        from grpc_tools import protoc

        protos = sorted(glob.glob(os.path.join(HERE, "proto", "yikatong", "v1", "*.proto")))
        if not protos:
            raise SystemExit("no .proto files under proto/yikatong/v1")
        well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        args = ["protoc", f"-I{os.path.join(HERE, 'proto')}", f"-I{well_known}",
                f"--python_out={HERE}", f"--pyi_out={HERE}", f"--grpc_python_out={HERE}",
                *protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed on " + " ".join(protos))
        super().run()


class build_ext(_build_ext):
    def finalize_options(self):
        from Cython.Build import cythonize

        self.distribution.ext_modules[:] = cythonize(
            self.distribution.ext_modules,
            compiler_directives={"language_level": 3, "linetrace": DEBUG, "binding": DEBUG})
        super().finalize_options()


setup(
    package_dir={"yikatong": "yikatong", "yikatong.server": "server",
                 "yikatong.storage": "storage", "yikatong.fastpath": "fastpath"},
    packages=["yikatong", "yikatong.v1", "yikatong.calendar", "yikatong.points", "yikatong.server",
              "yikatong.server.services",
              "yikatong.storage", "yikatong.fastpath"],
    package_data={"yikatong.fastpath": ["*.pyx", "*.pyi"], "yikatong.v1": ["*.pyi"],
                  "yikatong.calendar": ["*.toml"], "yikatong.points": ["*.toml"]},
    ext_modules=[Extension(
        "yikatong.fastpath._authorize_c",
        ["fastpath/_authorize_c.pyx"],
        define_macros=[("CYTHON_TRACE_NOGIL", "1")] if DEBUG else [],
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
        undef_macros=["NDEBUG"] if DEBUG else [],
    )],
    cmdclass={"build_py": build_py, "build_ext": build_ext},
)
