"""sgctl's controller, in layers; each imports only the layers below it
(checked by import-linter, see .importlinter):

    tools      the demo and the benchmark suite
    cli        `sgctl`
    service    the daemon: API server, store, metrics, flow logs
    reconcile  desired state -> plan (pure) -> converge (the one kernel writer)
    kernel     BPF syscalls, programs, maps, netlink, kernel reads
    policy     model, formats, EC2 actions, evaluator, compiler (pure)
    abi        every fact shared with bpf/lib: structs, constants, reasons
"""
