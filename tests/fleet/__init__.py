"""Tests that need an etcd server (each starts its own on 127.0.0.1)."""
