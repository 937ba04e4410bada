"""PyTorch-side code: the weight converters (PyTorch -> Flax), the weights fetcher, and the authors' guided step rebuilt for parity tests and timing. They import torch; bdjax itself never does."""
