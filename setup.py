"""The one compiled part: counting the query's terms and pairs in a pool's passages (aggregator/ranking/_kernel.c).

Optional: without a C compiler the build skips it with a warning and numpy
counts the same (pool._count_numpy; about 0.1 ms more CPU per retrieval).
No formula or constant of the ranking is compiled: pool.py and rerank.py
compute them from the counts either way. Everything else about the package
is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("aggregator.ranking._kernel", ["aggregator/ranking/_kernel.c"], optional=True, extra_compile_args=["-O2"])])
