"""Delivery platforms: one module per platform behind the interface in :mod:`bridges.base`."""

from bridges.base import Bridge, BridgeContext, Delivery, Notification, Outcome, OutcomeKind

__all__ = ["Bridge", "BridgeContext", "Delivery", "Notification", "Outcome", "OutcomeKind"]
