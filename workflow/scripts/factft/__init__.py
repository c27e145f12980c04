"""factft: the library behind the workflow's rules (one module per concern)."""
