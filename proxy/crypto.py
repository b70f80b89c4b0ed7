"""Encryption of tokens at rest in a shared store (CBPROXY_ENCRYPTION_KEY).

The variable holds one or more Fernet keys, comma-separated: the first encrypts, any
decrypts, so a key is rotated by putting the new one first and dropping the old one
once every record has been rewritten. `cryptography`'s Fernet (AES-128-CBC with an
HMAC-SHA256, versioned and timestamped tokens) and MultiFernet do this already, audited;
nothing here is hand-rolled.

Messages never contain a key or a token.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from proxy.errors import RecordUnreadable

_VARIABLE = "CBPROXY_ENCRYPTION_KEY"


class TokenCipher:
    """Encrypts with the first key, decrypts with any of them."""

    __slots__ = ("_fernet", "_key_count")

    def __init__(self, fernets: Sequence[Fernet]) -> None:
        if not fernets:
            raise ValueError(f"{_VARIABLE}: no key given")
        self._fernet = MultiFernet(list(fernets))
        self._key_count = len(fernets)

    @classmethod
    def from_keys(cls, keys: Sequence[str]) -> TokenCipher:
        """A cipher from Fernet keys, newest first; ValueError names a bad key by position."""
        keys = [key.strip() for key in keys]
        if not keys or not all(keys):
            raise ValueError("empty key; give one or more comma-separated keys")
        fernets = []
        for position, key in enumerate(keys, start=1):
            try:
                fernets.append(Fernet(key))
            except (ValueError, TypeError):
                # `from None`: the cause adds nothing useful and must never carry the key.
                raise ValueError(
                    f"key {position} of {len(keys)} is not a Fernet key "
                    "(32 url-safe base64-encoded bytes, as Fernet.generate_key() makes)"
                ) from None
        return cls(fernets)

    @classmethod
    def from_value(cls, value: str) -> TokenCipher:
        """A cipher from the variable's value: comma-separated keys, newest first."""
        return cls.from_keys(value.split(","))

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode("ascii")

    def decrypt(self, ciphertext: str) -> str:
        """The plaintext; RecordUnreadable when no key opens it (or it was tampered with)."""
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except (InvalidToken, UnicodeError):
            raise RecordUnreadable(
                f"cannot decrypt a stored token: wrong {_VARIABLE}? Keys are tried in order, "
                "so the key that wrote the record must still be in the list (put a new key "
                "first, keep the old one until every record has been rewritten)"
            ) from None

    def __repr__(self) -> str:
        return f"TokenCipher(keys={self._key_count})"
