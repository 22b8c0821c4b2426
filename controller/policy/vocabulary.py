"""The words documents and requests share -- EC2's and sgctl's own -- each
defined once, with the one parser of each."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

from controller.policy.errors import ValidationError

# Tags (AWS JSON, CloudFormation, the API) that carry an interface's host settings
TAG_DEVICE = "host-interface"  # the Linux device: the interface is bound on this host
TAG_MODE = "host-interface-mode"  # workload or host
TAG_ADDRESSES = "host-interface-addresses"  # "watch": follow the device's addresses
TAG_REVALIDATE = "host-interface-revalidate"  # cut connections a change no longer allows
TAG_MAC = "host-interface-mac"  # the instance's MAC (source check)
TAG_NODE = "host-node"  # the host whose agent binds the interface (fleet)
SETTING_TAGS = (TAG_DEVICE, TAG_MODE, TAG_ADDRESSES, TAG_REVALIDATE, TAG_MAC, TAG_NODE)


def user_tags(tags: Dict[str, str]) -> Dict[str, str]:
    """The tags that are the user's, not sgctl settings carried as tags."""
    return {k: v for k, v in tags.items() if k not in SETTING_TAGS}

FAMILIES: Mapping[Any, int] = {"IPv4": 4, "IPv6": 6}  # EC2's AddressFamily
NATIVE_FAMILIES: Mapping[Any, int] = {"ipv4": 4, "ipv6": 6, 4: 4, 6: 6}  # native ``family``

# ConnectionTrackingConfiguration / ConnectionTrackingSpecification -> Timeouts
TRACKING_TIMEOUTS = (("TcpEstablishedTimeout", "tcp_established"),
                     ("UdpStreamTimeout", "udp_stream"), ("UdpTimeout", "udp_other"))


def parse_family(value: Any, obj: str, fieldname: str = "AddressFamily",
                 words: Mapping[Any, int] = FAMILIES) -> int:
    """``IPv4`` -> 4, ``IPv6`` -> 6 (or the native words); anything else is an
    error naming it."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value not in words:
        names = " or ".join(w for w in words if isinstance(w, str))
        raise ValidationError(obj, fieldname, f"{value!r} is not {names}")
    return words[value]


def family_name(family: int) -> str:
    return f"IPv{family}"


def exactly_one(spec: Dict[str, Any], keys: Sequence[str], obj: str,
                code: str = "InvalidParameterValue") -> str:
    """The one of ``keys`` that ``spec`` gives (a rule's peer); none or
    several is an error listing what was given."""
    given = [k for k in keys if spec.get(k) is not None]
    if len(given) != 1:
        raise ValidationError(obj, keys[0], f"exactly one of {', '.join(keys)} is required "
                              f"(got {', '.join(given) or 'none'})", code=code)
    return given[0]
