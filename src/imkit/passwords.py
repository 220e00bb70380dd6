"""
Password hashing with argon2id, kept off the reactor thread.

An argon2id hash costs tens of milliseconds of CPU and memory by design; done on the reactor thread
it would stall every connection, so the work goes through ``run`` (a thread by default).  Tests
and the deterministic simulation pass a synchronous runner and cheap parameters instead.
"""

from __future__ import annotations

from typing import Any, Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from twisted.internet import defer

Runner = Callable[..., defer.Deferred]


def _synchronous(function: Callable[..., Any], *args: Any) -> defer.Deferred:
    return defer.maybeDeferred(function, *args)


def default_hasher() -> PasswordHasher:
    """
    argon2id with OWASP's recommended parameters (19 MiB, 2 passes, 1 lane).

    argon2-cffi's own default (RFC 9106's 64 MiB, 3 passes, 4 lanes) costs about 170 ms per login
    on a 2-core server, which a burst of reconnecting clients turns into seconds of queueing;
    OWASP's set costs about 30 ms and is still memory-hard.  Every hash records its parameters, so
    raising them later only needs ``needs_rehash`` at the next login.
    """
    return PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


class Passwords:
    """
    Hash and verify passwords with argon2-cffi's PasswordHasher (argon2id).

    ``run(function, *args) -> Deferred`` runs the CPU-heavy part; the default is
    ``twisted.internet.threads.deferToThread``.
    """

    def __init__(self, hasher: PasswordHasher | None = None, run: Runner | None = None) -> None:
        if run is None:
            from twisted.internet.threads import deferToThread as run
        self._hasher = hasher if hasher is not None else default_hasher()
        self._run = run
        self._dummy_hash: str | None = None

    @classmethod
    def fast_for_tests(cls) -> Passwords:
        """Minimal argon2 parameters and a synchronous runner: cheap, deterministic, insecure."""
        return cls(PasswordHasher(time_cost=1, memory_cost=8, parallelism=1), _synchronous)

    def hash(self, password: str) -> defer.Deferred:
        """Deferred[str]: a new salted argon2id hash of ``password``."""
        return self._run(self._hasher.hash, password)

    def verify(self, password_hash: str | None, password: str) -> defer.Deferred:
        """
        Deferred[bool]: whether ``password`` matches ``password_hash``.

        A mismatch or an invalid hash gives False, never an error.  A hash of None (no such user)
        also gives False, after the same work as a real check, so the time taken does not reveal
        whether a user name exists.
        """
        return self._run(self._verify, password_hash, password)

    def needs_rehash(self, password_hash: str) -> bool:
        """Whether the hash was made with other parameters than ours (or is not valid at all)."""
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True

    def _verify(self, password_hash: str | None, password: str) -> bool:
        if password_hash is None:
            if self._dummy_hash is None:
                self._dummy_hash = self._hasher.hash("imkit: no such user")
            self._check(self._dummy_hash, password)
            return False
        return self._check(password_hash, password)

    def _check(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False
