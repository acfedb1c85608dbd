"""Test configuration: one torch thread per pytest worker (make test runs two workers)."""

import torch

torch.set_num_threads(1)
