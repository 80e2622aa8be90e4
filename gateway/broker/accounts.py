"""Account changes reach connected clients at once (``users add/remove``, SIGHUP).

The password file is checked before every login, but a client already connected kept
the rights it logged in with: a removed account went on publishing jobs and reading
notifications over its open connection. :class:`AccountWatcher` notices the file
changing (a ``stat`` a second; the file is read on a thread only when it changed, and
SIGHUP re-reads it at once) and :func:`reconcile` applies the new accounts to every
session of a named account:

- account gone → its connection is closed (no will: the account has no rights left to
  publish one) and its persistent sessions are forgotten with their queues;
- password changed (another hash) → its connection is closed; the client must log in
  again with the new password; its session stays for when it does;
- role changed → the new role's ACL and limits apply at once, to what it publishes,
  subscribes to and receives (queued messages are checked again when sent);
- a remembered good password (logins.py) of an account that is gone or has another hash is
  forgotten (logins refuse it anyway: they compare the hash it matched with the file's).

``users add`` with the same password keeps the account's hash (passwords.add_user), so a
role change alone does not log the client out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from gateway.broker.passwords import Account, PasswordFile, PasswordFileError

if TYPE_CHECKING:
    from gateway.broker.embedded import GatewayBroker

log = structlog.get_logger(__name__)

POLL_S = 1.0


def reconcile(broker: GatewayBroker, accounts: dict[str, Account]) -> dict[str, int]:
    """Apply ``accounts`` to the sessions of named accounts; counts of what was done."""
    closed = updated = forgotten = 0
    broker.logins.forget_changed(accounts)   # a remembered good password of a changed account is not its own
    for cs in list(broker.clients()):
        username = cs.username
        if username is None or broker.is_gateway(cs):
            continue  # anonymous clients have no account; the gateway's own account is its own
        account = accounts.get(username)
        connected = cs.handler is not None
        if account is None:
            if connected:
                closed += 1
                log.warning("account removed: its client is disconnected", client_id=cs.client_id,
                            username=username)
                broker.disconnect(cs)
            if not cs.clean:
                forgotten += 1
                log.info("account removed: its persistent session is forgotten", client_id=cs.client_id,
                         username=username, queued=len(cs.pending))
                broker.forget(cs)
            continue
        if connected and cs.account_hash is not None and account.hash != cs.account_hash:
            closed += 1
            log.warning("account's password changed: its client is disconnected", client_id=cs.client_id,
                        username=username)
            broker.disconnect(cs)
            continue
        if connected and not broker.knows_role(account.role):
            closed += 1
            log.warning("account's new role is not in the configuration: its client is disconnected",
                        client_id=cs.client_id, username=username, role=account.role)
            broker.disconnect(cs)
            continue
        if account.role != cs.role:
            updated += connected
            log.info("account's role changed: new ACL and limits apply now", client_id=cs.client_id,
                     username=username, old_role=cs.role, new_role=account.role, connected=connected)
            broker.change_role(cs, account.role)
    broker.metrics.accounts_disconnected += closed
    broker.metrics.accounts_updated += updated
    return {"disconnected": closed, "updated": updated, "forgotten": forgotten}


class AccountWatcher:
    """Polls the password file's stamp; on a change, reads it (on a thread) and reconciles."""

    def __init__(self, broker: GatewayBroker, passwords: PasswordFile, interval_s: float = POLL_S,
                 stamp: Callable[[], object] | None = None):
        self._broker = broker
        self._passwords = passwords
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._stamp = stamp or passwords.stamp
        self._seen: object = self._stamp()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="broker-accounts")

    async def stop(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def check(self, force: bool = False) -> dict[str, int] | None:
        """Reconcile now if the file changed (or ``force``: SIGHUP); None when nothing changed."""
        stamp = self._stamp()
        if stamp == self._seen and not force:
            return None
        self._seen = stamp
        try:
            accounts = await asyncio.to_thread(self._passwords.reload_accounts if force else self._passwords.accounts)
        except (PasswordFileError, OSError) as exc:
            # A broken file changes nobody's rights (logins fail until it is fixed).
            log.error("password file unreadable; connected clients keep their accounts", error=str(exc))
            return None
        return reconcile(self._broker, dict(accounts))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception as exc:  # the watcher must outlive any one bad pass
                log.error("account check failed", error=repr(exc))
