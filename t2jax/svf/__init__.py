"""SVF: targets, SVD factors and their cache, composition of W'(z), expert files."""
