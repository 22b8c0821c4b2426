"""Tests that need nothing: no root, no kernel."""
