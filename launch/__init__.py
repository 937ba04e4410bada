"""Command-line programs (absl flags)."""
