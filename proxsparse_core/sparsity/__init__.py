"""2:4 itself: which weights are prunable, masks (extract, verify, pack) and the scores
that rank the weights of a group."""
