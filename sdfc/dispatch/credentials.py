"""Alibaba Cloud credentials for invoking the writer function.

In FC, every request to the sd-api function carries the role's fresh STS credentials in `x-fc-access-key-id`,
`x-fc-access-key-secret` and `x-fc-security-token` (FC's gateway strips such headers from clients); the same
role's credentials are also in the environment. The latest request's headers win, the environment is the
fallback, read at call time (alibabacloud-credentials reads it only at import).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    access_key_secret: str
    security_token: str | None = None


class CredentialSource:
    def __init__(self, env: Mapping[str, str] | None = None):
        self._env = env
        self._from_headers: Credentials | None = None
        self._lock = threading.Lock()

    def remember(self, headers: Mapping[str, str]) -> None:
        key_id, secret = headers.get("x-fc-access-key-id"), headers.get("x-fc-access-key-secret")
        if key_id and secret:
            with self._lock:
                self._from_headers = Credentials(key_id, secret, headers.get("x-fc-security-token") or None)

    def current(self) -> Credentials | None:
        with self._lock:
            if self._from_headers is not None:
                return self._from_headers
        env = os.environ if self._env is None else self._env
        key_id, secret = env.get("ALIBABA_CLOUD_ACCESS_KEY_ID"), env.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
        if key_id and secret:
            return Credentials(key_id, secret, env.get("ALIBABA_CLOUD_SECURITY_TOKEN") or None)
        return None
