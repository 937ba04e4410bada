"""PyTorch -> Flax weight converters. They import torch; bdjax itself never does."""
