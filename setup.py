"""The one compiled part: the rerank's arithmetic (aggregator/ranking/_kernel.c).

Optional: without a C compiler the build skips it with a warning and the
rerank uses its numpy and Python implementation (same results, about 0.25 ms
more CPU per retrieval). Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("aggregator.ranking._kernel", ["aggregator/ranking/_kernel.c"], optional=True, extra_compile_args=["-O2"])])
