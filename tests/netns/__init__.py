"""Tests with real traffic, devices, namespaces and daemons (root)."""
