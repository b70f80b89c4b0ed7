from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from proxy.crypto import TokenCipher
from proxy.errors import RecordUnreadable, StoreUnavailable

KEY_A = Fernet.generate_key().decode()
KEY_B = Fernet.generate_key().decode()
TOKEN = "access-token-0123456789abcdef"


def test_round_trip_hides_the_plaintext() -> None:
    cipher = TokenCipher.from_keys([KEY_A])
    ciphertext = cipher.encrypt(TOKEN)
    assert TOKEN not in ciphertext
    assert ciphertext != cipher.encrypt(TOKEN)  # fresh IV each time
    assert cipher.decrypt(ciphertext) == TOKEN


def test_first_key_encrypts_any_key_decrypts() -> None:
    old = TokenCipher.from_keys([KEY_A])
    rotated = TokenCipher.from_value(f"{KEY_B}, {KEY_A}")
    assert rotated.decrypt(old.encrypt(TOKEN)) == TOKEN
    written_by_rotated = rotated.encrypt(TOKEN)
    assert TokenCipher.from_keys([KEY_B]).decrypt(written_by_rotated) == TOKEN
    with pytest.raises(RecordUnreadable):
        old.decrypt(written_by_rotated)


def test_wrong_key_is_record_unreadable_with_advice() -> None:
    ciphertext = TokenCipher.from_keys([KEY_A]).encrypt(TOKEN)
    with pytest.raises(RecordUnreadable) as caught:
        TokenCipher.from_keys([KEY_B]).decrypt(ciphertext)
    message = str(caught.value)
    assert "CBPROXY_ENCRYPTION_KEY" in message
    assert "in order" in message
    assert KEY_A not in message
    assert KEY_B not in message
    assert not isinstance(caught.value, StoreUnavailable)  # a configuration error, no outage
    assert caught.value.code == "record_unreadable"


@pytest.mark.parametrize("ciphertext", ["", "not-a-fernet-token", "gAAAAAB" + "x" * 80])
def test_garbage_ciphertext_is_record_unreadable(ciphertext: str) -> None:
    with pytest.raises(RecordUnreadable):
        TokenCipher.from_keys([KEY_A]).decrypt(ciphertext)


def test_tampered_ciphertext_is_record_unreadable() -> None:
    cipher = TokenCipher.from_keys([KEY_A])
    ciphertext = cipher.encrypt(TOKEN)
    flipped = ciphertext[:-5] + ("A" if ciphertext[-5] != "A" else "B") + ciphertext[-4:]
    with pytest.raises(RecordUnreadable):
        cipher.decrypt(flipped)


@pytest.mark.parametrize(
    "bad_key",
    ["short-secret-key", "x" * 44, KEY_A[:-2], "üñíçødé-" * 5, "A" * 42 + "=="],
)
def test_malformed_key_is_a_value_error_that_never_shows_the_key(bad_key: str) -> None:
    with pytest.raises(ValueError, match="key 2 of 2 is not a Fernet key") as caught:
        TokenCipher.from_keys([KEY_A, bad_key])
    assert bad_key not in str(caught.value)
    assert KEY_A not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


@pytest.mark.parametrize("value", ["", " ", f"{KEY_A},", f",{KEY_A}"])
def test_empty_key_is_a_value_error(value: str) -> None:
    with pytest.raises(ValueError, match="empty key"):
        TokenCipher.from_value(value)
    with pytest.raises(ValueError, match="empty key"):
        TokenCipher.from_keys([])


def test_repr_shows_no_key() -> None:
    cipher = TokenCipher.from_keys([KEY_A, KEY_B])
    assert repr(cipher) == "TokenCipher(keys=2)"
    assert KEY_A not in repr(cipher)
