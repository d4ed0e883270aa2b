"""Bearer tokens: random, shown once, stored only as sha256 digests."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from nightowl.errors import Forbidden, InvalidInput
from nightowl.io import write_once

# User ids become URL segments and database keys, never path components; still, keep them to
# an alphabet that can't mean anything to a file system or a URL.
USER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A user's token is what new_token() makes: 32 random bytes, base64url without padding (43 characters).
# Anything else can be refused without asking the store.
USER_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")
# The longest Authorization header value worth hashing (admin tokens are configured, so any length up to this).
MAX_TOKEN_CHARS = 4096


def validate_user_id(user_id: str) -> str:
    if not isinstance(user_id, str) or not USER_ID_PATTERN.fullmatch(user_id):
        raise InvalidInput(
            "user_id must be 1-64 characters of letters, digits, '_' or '-' (no path characters)"
        )
    return user_id


def new_token() -> str:
    return secrets.token_urlsafe(32)


def looks_like_user_token(token: str) -> bool:
    return USER_TOKEN_PATTERN.fullmatch(token) is not None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value; None when it is missing or malformed."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
        return None
    return token


def hash_token(token: str) -> str:
    # Tokens carry 256 random bits, so a plain digest is enough (no salt/KDF needed):
    # a dictionary attack on them is hopeless.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: the admin, or exactly one user."""

    user_id: str | None  # None for the admin
    # The digest of the user's token that named them (None for the admin): a write that checks
    # it again in its own transaction (feedback) holds even if the user was deleted meanwhile.
    token_hash: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.user_id is None

    def require_user(self, user_id: str) -> None:
        if not self.is_admin and self.user_id != user_id:
            raise Forbidden("this token does not give access to that user")

    def require_admin(self) -> None:
        if not self.is_admin:
            raise Forbidden("this operation needs the admin token")


def load_or_create_admin_token(configured: str | None, home: Path) -> tuple[str, str | None]:
    """Returns (sha256 of the admin token, the token if it was just generated).

    With no NIGHTOWL_ADMIN_TOKEN set, a token is generated once into $home/admin_token
    (mode 0600) so a fresh install is usable and never open.
    """
    if configured:
        return hash_token(configured), None
    path = home / "admin_token"
    if path.exists():
        return hash_token(path.read_text().strip()), None
    token = new_token()
    if not write_once(path, (token + "\n").encode()):  # another process generated one first: use it
        return hash_token(path.read_text().strip()), None
    return hash_token(token), token


def same_token_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a, b)


class TokenCache:
    """Token digest -> user id, for the one request whose write checks the pair again in its own
    transaction (feedback: `FeedbackWrite` compares the user's stored digest). Looking a token up
    in the store cost a feedback request far more than its CPU (~7%) suggests: the read let go of
    the GIL on the event loop, and the group committer's wait to get it back held up the whole
    group. A stale entry (a user deleted, or deleted and created again with a new token) is
    refused by that write with a 401 and dropped. Every other request asks the store, so a
    deleted user's token stops reading at once. Bounded (least recently used first out); only
    tokens that the store confirmed get in."""

    def __init__(self, capacity: int = 10_000):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._users: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()  # filled from the event loop and, on PostgreSQL, the thread pool

    def get(self, token_hash: str) -> str | None:
        with self._lock:
            user_id = self._users.get(token_hash)
            if user_id is not None:
                self._users.move_to_end(token_hash)
            return user_id

    def put(self, token_hash: str, user_id: str) -> None:
        with self._lock:
            self._users[token_hash] = user_id
            self._users.move_to_end(token_hash)
            while len(self._users) > self.capacity:
                self._users.popitem(last=False)

    def forget(self, token_hash: str) -> None:
        with self._lock:
            self._users.pop(token_hash, None)

    def __len__(self) -> int:
        return len(self._users)
