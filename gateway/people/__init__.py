"""People: who a notification is for (contract §12)."""
