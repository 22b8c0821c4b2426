"""Tools apart from the product: the demo and the benchmark suite."""
