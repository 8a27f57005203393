"""One-shot 2:4 baselines with one signature (magnitude, Wanda, SparseGPT); the METHODS
registry in oneshot.py is the one place a new method is added."""
