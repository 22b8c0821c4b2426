"""ICMP and ICMPv6: echo tracking, errors matched to their connection."""

from typing import List

from controller.abi.reasons import Reason as R
from tests.kernel.packets import LOCAL, OTHER, REMOTE, Case, E, I, icmp, tin, tout

CASES: List[Case] = [
    Case("ICMP queries: a reply answers only its own request", [
        I(icmp(REMOTE, LOCAL, 13, ident=1), R.ALLOW_NEW),  # timestamp request
        E(icmp(LOCAL, REMOTE, 0, ident=1), R.DROP_NO_RULE),  # an echo reply is no answer
        E(icmp(LOCAL, REMOTE, 14, ident=1), R.ALLOW_ESTABLISHED),
        E(icmp(LOCAL, REMOTE, 13, ident=1), R.DROP_NO_RULE),  # nor its own request back
        E(icmp(LOCAL, REMOTE, 5, 1), R.DROP_NO_RULE),  # nor any other type
        E(icmp(LOCAL, REMOTE, 14, ident=2), R.DROP_NO_RULE),
        I(icmp(REMOTE, LOCAL, 13, ident=1), R.ALLOW_ESTABLISHED, at=29),
        E(icmp(LOCAL, REMOTE, 14, ident=1), R.DROP_NO_RULE, at=60),
    ], {"ingress": [{"proto": "icmp", "type": 13, "code": -1, "from": "0.0.0.0/0"}],
        "egress": []}),
    Case("ICMP other types and replies are judged per packet, never tracked", [
        I(icmp(REMOTE, LOCAL, 5, 1), R.ALLOW_UNTRACKED),  # allowed here...
        E(icmp(LOCAL, REMOTE, 5, 1), R.DROP_NO_RULE),  # ...opens nothing
        E(icmp(LOCAL, REMOTE, 8, ident=3), R.DROP_NO_RULE),
        I(icmp(REMOTE, LOCAL, 0, ident=3), R.ALLOW_UNTRACKED),  # an echo reply opens nothing
        E(icmp(LOCAL, REMOTE, 8, ident=3), R.DROP_NO_RULE),
    ], {"ingress": [{"proto": "icmp", "type": 5, "code": -1, "from": "0.0.0.0/0"},
                    {"proto": "icmp", "type": 0, "code": -1, "from": "0.0.0.0/0"}],
        "egress": []}),
    Case("related ICMP errors must be consistent with their connection", [
        I(tin(5000, 80), R.ALLOW_NEW),
        E(icmp(LOCAL, REMOTE, 3, 3, inner=tin(5000, 80)), R.ALLOW_RELATED),
        E(icmp(LOCAL, OTHER, 3, 3, inner=tin(5000, 80)), R.DROP_NO_RULE),  # not to its source
        E(icmp(LOCAL, REMOTE, 3, 3, inner=tin(5000, 81)), R.DROP_NO_RULE),
        E(tout(6000, 443), R.ALLOW_NEW),
        I(icmp(OTHER, LOCAL, 3, 4, inner=tout(6000, 443)), R.ALLOW_RELATED),  # a router on the path
        I(icmp(OTHER, LOCAL, 3, 4, inner=tout(6000, 443, src=OTHER)), R.DROP_NO_RULE),
    ], {"ingress": [{"proto": "tcp", "ports": 80, "from": "198.18.1.0/24"}],
        "egress": [{"proto": "tcp", "ports": 443, "to": "0.0.0.0/0"}]}),
]
