"""Shared test setup."""

import torch

# Small models run fastest on one thread, and a second intra-op thread competing with other
# processes on a 2-core machine can slow a batch-1 forward pass by orders of magnitude.
torch.set_num_threads(1)
