"""Bundled demo model repository (models/) and the script that builds it."""
