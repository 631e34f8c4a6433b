"""Elastic training (as in ERNIE 5.0): one run trains the full model and sub-models of smaller depth, fewer experts and
smaller top-k; `space` defines them, `sampler` picks one per micro-step, `extract` cuts one out as a standalone
model; `ernie5.evaluation.elastic` scores a grid of them (`ernie5 eval --mode elastic`)."""
