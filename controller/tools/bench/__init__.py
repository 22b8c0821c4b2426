"""Benchmarks (make bench): python -m controller.bench."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable


def on_sigterm(main_pid: int) -> Callable[..., Any]:
    """A SIGTERM handler that lets the scenarios clean up (finally blocks) in
    the main process only: pyroute2's NetNS forks helpers that inherit the
    handler and are ended with SIGTERM -- cleaning up there would delete the
    namespace under the benchmark's feet."""

    def handler(*_: Any) -> None:
        if os.getpid() == main_pid:
            sys.exit(1)
        os._exit(0)

    return handler
