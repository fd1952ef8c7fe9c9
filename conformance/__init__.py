"""Contract and cross-implementation checks (decision vectors)."""
