"""pneumoseg."""
