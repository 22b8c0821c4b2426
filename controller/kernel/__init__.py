"""Kernel: the BPF syscalls, the programs and their pinned maps (one module per
map family), netlink attach, and the reads of kernel state (conntrack,
counters, explain)."""
