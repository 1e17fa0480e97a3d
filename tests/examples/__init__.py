"""Small adapted copies of pytorch/examples programs (see LICENSE), used as real-code workloads."""
