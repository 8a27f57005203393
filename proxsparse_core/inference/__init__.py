"""Using a pruned model: perplexity, agreement with dense, generation, and 2:4 sparse
kernels with their speed-up measurement."""
