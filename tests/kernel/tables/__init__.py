"""The fixture tables, one file per feature; ``CASES`` is all of them."""

from tests.kernel.tables import exemptions, icmp, parsing, source_check, stateful

CASES = [*stateful.CASES, *source_check.CASES, *exemptions.CASES, *icmp.CASES, *parsing.CASES]
