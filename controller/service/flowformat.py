"""The flow-log record format: AWS VPC Flow Logs' fields (and ours), the
``${field}`` format strings and the text form. Pure; shared by the logger
and ``sgctl flows``."""

from __future__ import annotations

import re
from typing import Any, Dict, List

# field -> flow log version that introduced it (0: ours, not AWS's)
FIELDS: Dict[str, int] = {
    "version": 2, "account-id": 2, "interface-id": 2, "srcaddr": 2, "dstaddr": 2,
    "srcport": 2, "dstport": 2, "protocol": 2, "packets": 2, "bytes": 2, "start": 2,
    "end": 2, "action": 2, "log-status": 2,
    "vpc-id": 3, "subnet-id": 3, "instance-id": 3, "tcp-flags": 3, "type": 3,
    "pkt-srcaddr": 3, "pkt-dstaddr": 3,
    "region": 4, "az-id": 4, "sublocation-type": 4, "sublocation-id": 4,
    "pkt-src-aws-service": 5, "pkt-dst-aws-service": 5, "flow-direction": 5,
    "traffic-path": 5,
    "reject-reason": 0, "rule-id": 0, "group-id": 0, "interface": 0,
}


DEFAULT_FORMAT = ("${version} ${account-id} ${interface-id} ${srcaddr} ${dstaddr} ${srcport} "
                  "${dstport} ${protocol} ${packets} ${bytes} ${start} ${end} ${action} "
                  "${log-status}")


class FlowLogError(ValueError):
    pass


def parse_format(text: str) -> List[str]:
    """AWS syntax ``${field} ${field} ...`` -> the field names, checked."""
    if not text.strip():
        raise FlowLogError("flow log format: empty")
    names = []
    for token in text.split():
        m = re.fullmatch(r"\$\{([a-z0-9-]+)\}", token)
        if m is None:
            raise FlowLogError(f"flow log format: {token!r} is not of the form ${{field}}")
        if m.group(1) not in FIELDS:
            raise FlowLogError(f"flow log format: unknown field {m.group(1)!r} "
                               f"(known: {', '.join(FIELDS)})")
        names.append(m.group(1))
    return names


def text_line(values: Dict[str, Any], fields: List[str]) -> str:
    """AWS's text form: the fields in order, space-separated, ``-`` for none."""
    return " ".join("-" if values[f] is None else str(values[f]) for f in fields)
