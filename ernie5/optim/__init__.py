"""AdamW (fused multi-tensor on CPU), parameter groups and the learning-rate schedules."""
