"""Package build. Metadata lives in pyproject.toml; this file only adds the optional native
extension built from csrc/ (CPU-side hot spots, each with a pure-Python reference).

The extension is `optional=True`: on a machine without a C++ compiler the build prints a warning
and the package installs without it, falling back to the Python reference implementations.
"""

from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).parent
sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cpp"))

ext_modules = []
if sources:
    ext_modules.append(
        Extension(
            "mrt_fast._native",
            sources=sources,
            language="c++",
            extra_compile_args=["-O3", "-std=c++17"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
