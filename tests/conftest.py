"""Shared test setup."""

import pytest
import torch

# Small models run fastest on one thread, and a second intra-op thread competing with other
# processes on a 2-core machine can slow a batch-1 forward pass by orders of magnitude.
torch.set_num_threads(1)


@pytest.fixture
def codes_like_a_fresh_copy():
    """check(model, x, codes, changes): after each change of a tokenizer whose caches are warm,
    it encodes x and decodes codes exactly as a fresh copy of it (cold caches) does."""
    import rvq_tokenizer

    def check(model, x, codes, changes):
        for change in changes:
            change()
            fresh = rvq_tokenizer.RVQTokenizer(model.config)
            fresh.load_state_dict(model.state_dict())
            fresh.eval()
            assert torch.equal(model.encode(x), fresh.encode(x))
            assert torch.equal(model.decode(codes), fresh.decode(codes))
    return check
