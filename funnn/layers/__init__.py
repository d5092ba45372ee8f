"""Layer catalogue: each family in its own file, forward and backward side by side."""
