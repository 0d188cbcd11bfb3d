"""Build the compiled rendezvous core (``rdzv._state``) with Cython.

There is deliberately no pure-Python fallback: if Cython or a C compiler is
missing, the install fails instead of silently shipping a slower core.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension("rdzv._state", ["src/rdzv/_state.pyx"]),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "embedsignature": True,
        },
    ),
)
