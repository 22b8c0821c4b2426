"""Policy: the security-group model, its document formats, the EC2 actions on it,
the reference evaluator and the compiler to kernel tables. Pure: no kernel,
no sockets, no files."""
