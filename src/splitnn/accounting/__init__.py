"""Accounting: the byte ledger of transfers between parties (and compute counters)."""

from splitnn.accounting.ledger import KINDS, RESEARCHER, Ledger, LinkTotal

__all__ = ["KINDS", "RESEARCHER", "Ledger", "LinkTotal"]
