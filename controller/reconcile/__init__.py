"""The reconciler: desired state + host + what was applied -> a plan (pure,
plan.py) -> the kernel (converge.py, the one code path that writes policy to
the kernel). The daemon, the one-shot CLI and the tests all converge here."""
