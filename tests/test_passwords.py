"""Passwords: argon2id hashing through a runner, never raising for a wrong password."""

from __future__ import annotations

import threading

from argon2 import PasswordHasher
from twisted.internet import defer
from twisted.trial import unittest

from imkit.passwords import Passwords

FAST = dict(time_cost=1, memory_cost=8, parallelism=1)


class PasswordsTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.passwords = Passwords.fast_for_tests()

    def hash(self, password: str) -> str:
        return self.successResultOf(self.passwords.hash(password))

    def verify(self, password_hash, password: str) -> bool:
        return self.successResultOf(self.passwords.verify(password_hash, password))

    def test_hash_is_salted_argon2id(self) -> None:
        first, second = self.hash("secret"), self.hash("secret")
        self.assertTrue(first.startswith("$argon2id$"))
        self.assertNotEqual(first, second)

    def test_verify(self) -> None:
        password_hash = self.hash("correct horse")
        self.assertIs(self.verify(password_hash, "correct horse"), True)
        self.assertIs(self.verify(password_hash, "correct horsE"), False)
        self.assertIs(self.verify(password_hash, ""), False)

    def test_unicode_and_empty_passwords(self) -> None:
        for password in ("", "pässwörd", "🔑" * 100):
            self.assertIs(self.verify(self.hash(password), password), True)
        self.assertIs(self.verify(self.hash("e\u0301"), "\u00e9"), False)

    def test_invalid_or_missing_hash_is_false(self) -> None:
        for password_hash in ("", "not a hash", "$argon2id$v=19$m=8,t=1,p=1$xx$yy", None):
            self.assertIs(self.verify(password_hash, "anything"), False)

    def test_needs_rehash(self) -> None:
        password_hash = self.hash("x")
        self.assertFalse(self.passwords.needs_rehash(password_hash))
        self.assertTrue(Passwords(PasswordHasher()).needs_rehash(password_hash))
        self.assertTrue(self.passwords.needs_rehash("garbage"))

    def test_work_goes_through_the_runner(self) -> None:
        ran = []

        def run(function, *args):
            ran.append(function)
            return defer.maybeDeferred(function, *args)

        passwords = Passwords(PasswordHasher(**FAST), run)
        password_hash = self.successResultOf(passwords.hash("x"))
        self.assertTrue(self.successResultOf(passwords.verify(password_hash, "x")))
        self.assertEqual(len(ran), 2)


class DefaultRunnerTests(unittest.TestCase):
    async def test_hashes_off_the_reactor_thread(self) -> None:
        """By default the CPU-heavy work runs in the reactor's thread pool."""
        threads = []
        hasher = PasswordHasher(**FAST)

        class Recording(PasswordHasher):
            def hash(self, password, **kwargs):
                threads.append(threading.current_thread())
                return hasher.hash(password)

        passwords = Passwords(Recording(**FAST))
        password_hash = await passwords.hash("secret")
        self.assertTrue(await passwords.verify(password_hash, "secret"))
        self.assertFalse(await passwords.verify(password_hash, "wrong"))
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads[0], threading.main_thread())
