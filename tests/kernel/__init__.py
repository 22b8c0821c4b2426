"""Tests that run the real programs with BPF_PROG_TEST_RUN (root, bcc)."""
