"""Tools that measure bdjax, apart from the programs a user runs (launch/): the benchmark of the
guided step against the authors' PyTorch step (`reference.py`), the compile report for TPUs and
GPUs compiled without them, and the GPU proof. Not installed with the package: run them from a
checkout (`python -m bench.benchmark`), where the test-only references they need are installed."""
