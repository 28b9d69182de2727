"""API keys for the Serve app: which keys are accepted, and the 401 for a request without one.

Keys come from ``serve.api_keys_env`` (an environment variable, comma- or whitespace-separated) and
``serve.api_keys_file`` (one per line, ``#`` comments), read where the app is built. Only their
SHA-256 digests travel to the replicas, so the keys themselves never reach Ray's stored deployment
arguments, logs, ``/stats`` or the job's summary. A server with keys answers a request whose
``Authorization: Bearer <key>`` is missing or wrong with OpenAI's 401 error.

Without keys the endpoint is open: allowed only when ``serve.require_api_keys`` is false, or when it
is unset and the proxy binds a loopback address (the local default, 127.0.0.1). The ``cluster``
profile sets it true.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from clp_ray.errors import ConfigError
from clp_ray.serving.openai_api import ApiError


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKeys:
    """The accepted keys' digests; empty: the endpoint is open."""

    digests: tuple[str, ...] = ()

    @classmethod
    def of(cls, keys: list[str]) -> ApiKeys:
        return cls(tuple(sorted({_digest(k) for k in keys})))

    @property
    def required(self) -> bool:
        return bool(self.digests)

    def __repr__(self) -> str:  # never the digests either: nothing about a key in a log line
        return f"ApiKeys({len(self.digests)} accepted)" if self.digests else "ApiKeys(open)"

    def check(self, authorization: Optional[str]) -> None:
        """Raise OpenAI's 401 unless ``authorization`` is ``Bearer <an accepted key>`` (or no key is required)."""
        if not self.digests:
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "You didn't provide an API key. Send it in an Authorization header using Bearer "
                           "auth (Authorization: Bearer YOUR_KEY); with the openai client, api_key=YOUR_KEY.",
                           code="invalid_api_key")
        presented = _digest(token.strip())
        if not any(hmac.compare_digest(presented, d) for d in self.digests):  # constant time per key
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


def read_keys(env_name: Optional[str], file: Optional[str], environ=os.environ) -> list[str]:
    """The keys in ``$env_name`` and in ``file`` (a missing or unreadable file is a ConfigError)."""
    keys = re.split(r"[\s,]+", environ.get(env_name, "")) if env_name else []
    if file:
        path = Path(file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"serve.api_keys_file: cannot read {path}: {e.strerror or e}") from None
        keys += [line.split("#", 1)[0].strip() for line in lines]
    return [k for k in keys if k]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _key_sources(serve_cfg) -> str:
    """Where keys go, as the messages name it: ``$CLP_RAY_API_KEYS or serve.api_keys_file``."""
    return f"${serve_cfg.api_keys_env} or serve.api_keys_file" if serve_cfg.api_keys_env else "serve.api_keys_file"


def api_keys_for(serve_cfg, environ=os.environ) -> ApiKeys:
    """The keys the app accepts; a ConfigError when keys are required and there are none."""
    keys = ApiKeys.of(read_keys(serve_cfg.api_keys_env, serve_cfg.api_keys_file, environ))
    required = serve_cfg.require_api_keys
    if required is None:
        required = not is_loopback(serve_cfg.host)
    if required and not keys.required:
        why = ("serve.require_api_keys is true" if serve_cfg.require_api_keys
               else f"serve.host {serve_cfg.host} is reachable from other machines")
        raise ConfigError(f"the Serve app needs API keys ({why}) and none are set: put them in {_key_sources(serve_cfg)}, "
                          "or set serve.require_api_keys=false to serve without authentication")
    return keys


def describe(keys: ApiKeys, serve_cfg) -> str:
    """One line for the start-up log: who may call the endpoint."""
    if keys.required:
        return f"API keys required ({len(keys.digests)} accepted): requests need Authorization: Bearer <key>"
    return (f"no API keys: the endpoint is open to anyone who can reach {serve_cfg.host}:{serve_cfg.port} "
            f"(set {_key_sources(serve_cfg)} to require keys)")
