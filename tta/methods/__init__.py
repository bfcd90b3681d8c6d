"""The method math, one module per method: plain PyTorch, no Lightning, no Hydra."""
