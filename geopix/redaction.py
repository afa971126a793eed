"""What GeoPix never writes out: secret values, wherever a text would carry them (logs, errors,
MLflow params and artifacts, the run summary, Ray's job/actor/task metadata).

Two rules, used together:

* **by key** — a value is secret when a part of its dotted key is one of :data:`SECRET_KEYS` or
  ends in ``_<one of them>`` (``stack.s3_secret_access_key``, ``db.password``, ``ray_auth_token``).
  The list is exact: ``model.seg_token_num``, ``evaluate.max_new_tokens`` or
  ``train.tokenizer_vocab_size`` merely contain "token" and stay visible.
* **by value shape** — whatever the key: the password of a URI (``scheme://user:pass@host``, a
  password holding ``/`` included), the value of a credential query parameter (``?token=…``,
  ``X-Amz-Signature=…``), and any value of a secret environment variable of this process
  (:data:`SECRET_ENV_VARS`), wherever it appears in a text.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import SecretStr

REDACTED = "<redacted>"

SECRET_KEYS = frozenset({
    "secret", "secret_key", "secret_access_key", "session_token", "security_token", "password", "passwd",
    "token", "auth_token", "access_token", "refresh_token", "id_token", "bearer_token", "api_key", "apikey",
    "private_key", "client_secret", "credentials",
})  # fmt: skip

# Environment variables whose values are credentials (never copied to workers, never printed).
SECRET_ENV_VARS = frozenset({
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "DATABRICKS_TOKEN", "RAY_AUTH_TOKEN",
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AZURE_STORAGE_KEY", "AZURE_CLIENT_SECRET", "GOOGLE_API_KEY",
})  # fmt: skip

# scheme://user:password@host  (the password may hold "/", ":", even "@": up to the last "@")
URI_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^\s'\"]+)@", re.IGNORECASE)
# ?token=… &X-Amz-Signature=…  (presigned URLs, API tokens in query strings)
QUERY_SECRET = re.compile(
    r"(?P<head>[?&](?:token|access_token|auth_token|api_key|apikey|key|password|secret|sig|signature"
    r"|x-amz-signature|x-amz-security-token|x-amz-credential|code)=)(?P<secret>[^&#\s'\"]+)",
    re.IGNORECASE,
)
# Variables that make up credentials: a secret, or half of a key pair (a worker handed the key id
# without its secret fails instead of falling back to its own instance role).
CREDENTIAL_ENV_VARS = SECRET_ENV_VARS | {"AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_USERNAME"}
MIN_ENV_SECRET_LENGTH = 6  # shorter values ("x", "1") would redact half of every text


def is_secret_key(key: str) -> bool:
    """Whether a (dotted) config key or parameter name holds a secret: one of its parts is a secret
    name (``stack.s3_secret_access_key``, and anything under it)."""
    for name in str(key).lower().replace("-", "_").split("."):
        if name in SECRET_KEYS or any(name.endswith("_" + secret) for secret in SECRET_KEYS):
            return True
    return False


def env_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of this process's secret environment variables (longest first)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if k in SECRET_ENV_VARS and len(v) >= MIN_ENV_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, extra_secrets: Iterable[str] = ()) -> str:
    """``text`` with URI passwords, credential query values and known secret values replaced."""
    text = URI_PASSWORD.sub(rf"\g<head>{REDACTED}@", text)
    text = QUERY_SECRET.sub(rf"\g<head>{REDACTED}", text)
    for secret in [*env_secrets(), *(s for s in extra_secrets if s and len(s) >= MIN_ENV_SECRET_LENGTH)]:
        text = text.replace(secret, REDACTED)
    return text


def redact_value(key: str, value: Any) -> Any:
    """A parameter's value as it may be shown: secret keys and SecretStr hidden, texts scrubbed."""
    if isinstance(value, SecretStr):
        return REDACTED
    if is_secret_key(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_tree(node: Any, path: str = "") -> Any:
    """A nested dict/list with every secret value replaced (keys as in :func:`redact_value`)."""
    if isinstance(node, Mapping):
        return {k: redact_tree(v, f"{path}{k}.") for k, v in node.items()}
    if isinstance(node, list):
        return [redact_tree(v, path) for v in node]
    return redact_value(path.rstrip("."), node)


def redact_override(override: str) -> str:
    """``section.key=value`` as it may be echoed: the value hidden when the key is secret."""
    key, sep, value = override.partition("=")
    if not sep:
        return redact_text(override)
    return f"{key}={REDACTED if is_secret_key(key.strip()) and value else redact_text(value)}"


def has_credentials(uri: str | None) -> bool:
    """Whether a URI carries a password or a credential query parameter."""
    return bool(uri) and (URI_PASSWORD.search(uri) is not None or QUERY_SECRET.search(uri) is not None)


def shareable_env(environ: Mapping[str, str], prefixes: tuple[str, ...]) -> dict[str, str]:
    """The variables with these prefixes that may go into another process's metadata (Ray's runtime
    env): no credential variable, and no value that carries credentials (a URI with a password)."""
    return {
        k: v for k, v in environ.items()
        if k.startswith(prefixes) and k not in CREDENTIAL_ENV_VARS and not is_secret_key(k) and not has_credentials(v)
    }  # fmt: skip
