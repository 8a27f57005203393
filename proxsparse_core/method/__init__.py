"""ProxSparse itself: the 2:4 proximal operator and its CPU/GPU kernels, the learner, self-
distillation, and the masked-training loop that recovery shares."""
