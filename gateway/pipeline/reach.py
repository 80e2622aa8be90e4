"""Reaching people (contract §12): what a job that targets people does with their devices.

(Filled in below: expansion of a people target, the ack that reaches a person, the end of
what a removed person leaves.)"""

from __future__ import annotations

import sqlite3

from gateway.people import store as people


def remove_person(conn: sqlite3.Connection, person_id: str, now: float) -> bool:
    """Remove a person from the registry; False if there was none."""
    return people.remove(conn, person_id)


__all__ = ["remove_person"]
