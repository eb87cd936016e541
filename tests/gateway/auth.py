"""Credentials for the gateway tests: a token issuer with its own key pair, and an API key table.

The issuer signs ES256 JWTs with a P-256 key generated per test session (PyJWT + cryptography);
the gateway only ever sees the public half, in a JWKS file, exactly as it would see an identity
provider's published keys.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from agentmesh.services.cli.gateway import GatewayAuth

ISSUER = "https://id.agentmesh.test/"
AUDIENCE = "agentmesh-gateway"


@dataclass
class Issuer:
    """An identity provider in miniature: one signing key, published as a JWKS."""

    kid: str = "test-key-1"
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def jwks(self) -> dict:
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [public | {"kid": self.kid, "alg": "ES256", "use": "sig"}]}

    def token(self, **claims: object) -> str:
        """A signed token for tenant ``acme``, subject ``alice``, valid 10 minutes; ``claims``
        override or (with value None) remove any claim."""
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "tenant": "acme", "iat": now, "exp": now + 600}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, self.key, algorithm="ES256", headers={"kid": self.kid})


@dataclass
class ApiKeys:
    """Three API keys: a user and an admin of tenant ``acme``, a user of tenant ``globex``."""

    acme_user: str = field(default_factory=lambda: "amk_" + secrets.token_urlsafe(24))
    acme_admin: str = field(default_factory=lambda: "amk_" + secrets.token_urlsafe(24))
    globex_user: str = field(default_factory=lambda: "amk_" + secrets.token_urlsafe(24))

    def table(self) -> str:
        return (
            "# API keys of the gateway tests: <key> <tenant> <subject> [roles]\n"
            f"{self.acme_user} acme acme-reporting\n"
            f"{self.acme_admin}   acme  acme-ops   admin,ingest\n"
            "\n"
            f"{self.globex_user} globex globex-bot reader\n"
        )


def write_credentials(folder: Path, issuer: Issuer, keys: ApiKeys) -> GatewayAuth:
    """Write the JWKS and the API key table into ``folder``; the gateway auth that uses them."""
    folder.mkdir(parents=True, exist_ok=True)
    jwks = folder / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    table = folder / "api-keys.txt"
    table.write_text(keys.table())
    table.chmod(0o600)
    return GatewayAuth(jwks_path=jwks, issuer=ISSUER, audience=AUDIENCE, api_keys_path=table)


def bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")
