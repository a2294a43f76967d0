"""Data: read -> validate -> tokenize with loss mask -> batches."""
