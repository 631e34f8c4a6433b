"""Command-line tools above the training stack: tokenizer training, the run summary."""
