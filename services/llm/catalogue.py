"""The model catalogue: model aliases → deployments, limits and budgets (YAML, validated with
pydantic). ``services/llm/models.example.yaml`` shows every field; ``README.md`` explains them.

A catalogue file never holds an API key: a deployment names the environment variable that holds
it (``api_key_env``), read when the catalogue is loaded (a missing variable fails the load, naming
it). With no catalogue file the router builds a one-deployment catalogue from the
``AGENTMESH_LLM_*`` provider settings (:func:`from_settings`), with ``passthrough`` on so any
model name is sent to that provider as before.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from agentmesh.services.runtime.context import TENANT_PATTERN

ProviderKind = Literal["openai", "azure", "anthropic", "extractive"]
Strategy = Literal["fallback", "weighted", "least_in_flight", "lowest_latency", "lowest_cost"]
BudgetPeriod = Literal["day", "month", "total"]

#: Model name that selects the extractive provider explicitly (reserved: no alias may use it).
EXTRACTIVE = "extractive"
_NAME = re.compile(r"^[A-Za-z0-9_.:/@-]{1,128}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class CatalogueError(ValueError):
    """The catalogue file is missing, not YAML, or invalid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CircuitBreakerConfig(_Strict):
    """When a deployment's circuit opens: at least ``min_requests`` finished calls in the last
    ``window_s`` seconds of which at least ``failure_rate`` failed. It stays open ``open_s``
    seconds, then lets one probe call through (half-open): success closes it, failure re-opens it."""

    window_s: float = Field(30.0, gt=0)
    min_requests: int = Field(5, ge=1)
    failure_rate: float = Field(0.5, gt=0, le=1)
    open_s: float = Field(30.0, gt=0)


class DeploymentConfig(_Strict):
    """One upstream the router can call."""

    name: str = Field(description="Unique in the catalogue; RoutingOptions.deployment names it.")
    provider: ProviderKind
    model: str = Field("", description="Upstream model (Azure: deployment name); empty = provider default.")
    base_url: str = Field("", description="Endpoint; empty = the provider's public API (required for azure).")
    api_key_env: str = Field("", description="Environment variable holding the API key; empty = no key.")
    api_version: str = Field("", description="Azure OpenAI api-version; empty = the router default.")
    client: Literal["lean", "httpx", "sdk"] | None = Field(None, description="Transport; empty = AGENTMESH_LLM_CLIENT.")
    weight: int = Field(1, ge=0, le=1_000_000, description="Share under the weighted strategy (0 = only as failover).")
    rpm: int = Field(0, ge=0, description="Requests per minute across all router replicas; 0 = unlimited.")
    tpm: int = Field(0, ge=0, description="Tokens per minute across all router replicas; 0 = unlimited.")
    input_usd_per_mtok: float = Field(0.0, ge=0, description="USD per million input tokens.")
    output_usd_per_mtok: float = Field(0.0, ge=0, description="USD per million output tokens.")
    context_window: int = Field(0, ge=0, description="Prompt + completion tokens the model accepts; 0 = unchecked.")
    first_token_timeout_s: float | None = Field(None, gt=0, description="Empty = AGENTMESH_LLM_FIRST_TOKEN_TIMEOUT_S.")
    total_timeout_s: float | None = Field(None, gt=0, description="Empty = AGENTMESH_LLM_TOTAL_TIMEOUT_S.")
    max_retries: int | None = Field(None, ge=0, le=10, description="Empty = AGENTMESH_LLM_PROVIDER_MAX_RETRIES.")
    circuit_breaker: CircuitBreakerConfig | None = None

    _api_key: str = PrivateAttr("")
    _key_variable: str = PrivateAttr("")

    @model_validator(mode="before")
    @classmethod
    def _no_keys(cls, data: object) -> object:
        if isinstance(data, dict) and any(k in data for k in ("api_key", "key", "secret")):
            raise ValueError(
                "a catalogue never holds an API key: put the key in an environment variable and name "
                "that variable in api_key_env"
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> DeploymentConfig:
        if not _NAME.match(self.name):
            raise ValueError(f"deployment name {self.name!r} must match {_NAME.pattern}")
        if self.name == EXTRACTIVE and self.provider != EXTRACTIVE:
            raise ValueError(f"deployment name {EXTRACTIVE!r} is reserved for the extractive provider")
        if self.api_key_env and not _ENV_NAME.match(self.api_key_env):
            raise ValueError(f"api_key_env {self.api_key_env!r} is not an environment variable name")
        if self.provider == "azure" and not (self.base_url and self.model):
            raise ValueError("an azure deployment needs base_url (https://NAME.openai.azure.com) and model "
                             "(the Azure deployment name)")
        return self

    @property
    def api_key(self) -> str:
        """The key read from ``api_key_env`` at load time (never serialized)."""
        return self._api_key

    @property
    def key_variable(self) -> str:
        """Where the key comes from, for error messages."""
        return self._key_variable or self.api_key_env or "(no key configured)"

    def price_usd(self, input_tokens: int, output_tokens: int) -> float:
        """Cost of a call in USD from this deployment's prices (per million tokens)."""
        return (input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok) / 1e6


class ModelConfig(_Strict):
    """A model alias: the deployments that serve it and how one is picked."""

    strategy: Strategy = "fallback"
    deployments: list[DeploymentConfig] = Field(min_length=1)
    fallbacks: list[str] = Field(default_factory=list, description="Aliases tried once every deployment failed.")
    context_window_fallbacks: list[str] = Field(
        default_factory=list, description="Aliases used when the request fits no deployment's context window."
    )


class LimitConfig(_Strict):
    """Limits of one tenant or API key, enforced across all router replicas (Redis)."""

    rpm: int = Field(0, ge=0, description="Requests per minute; 0 = unlimited.")
    tpm: int = Field(0, ge=0, description="Tokens per minute (prompt + completion); 0 = unlimited.")
    budget_usd: float = Field(0.0, ge=0, description="Spend allowed per period in USD; 0 = no budget.")
    budget_period: BudgetPeriod = "month"

    @property
    def active(self) -> bool:
        return bool(self.rpm or self.tpm or self.budget_usd)


class LimitsConfig(_Strict):
    """Per-tenant and per-API-key limits. A tenant (key) not listed gets ``default_tenant``
    (``default_api_key``); no entry = no limit (spend is still tracked)."""

    tenants: dict[str, LimitConfig] = Field(default_factory=dict)
    default_tenant: LimitConfig | None = None
    api_keys: dict[str, LimitConfig] = Field(default_factory=dict)
    default_api_key: LimitConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> LimitsConfig:
        for tenant in self.tenants:
            if not TENANT_PATTERN.match(tenant):
                raise ValueError(f"tenant {tenant!r} is not a valid tenant id ({TENANT_PATTERN.pattern})")
        return self

    def for_tenant(self, tenant: str) -> LimitConfig | None:
        return self.tenants.get(tenant, self.default_tenant)

    def for_api_key(self, key_id: str) -> LimitConfig | None:
        return self.api_keys.get(key_id, self.default_api_key) if key_id else None

    @property
    def any(self) -> bool:
        return bool(self.tenants or self.api_keys or self.default_tenant or self.default_api_key)


class Catalogue(_Strict):
    """The whole catalogue file."""

    default_model: str = Field("", description="Alias used when a request names no model; empty = the first.")
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    passthrough: bool = Field(
        False, description="Send a model name that is no alias to the default alias's deployments as the upstream model."
    )

    @model_validator(mode="after")
    def _check(self) -> Catalogue:
        seen: dict[str, str] = {}
        for alias, model in self.models.items():
            if not _NAME.match(alias):
                raise ValueError(f"model alias {alias!r} must match {_NAME.pattern}")
            if alias == EXTRACTIVE:
                raise ValueError(f"model alias {EXTRACTIVE!r} is reserved for the extractive provider")
            for dep in model.deployments:
                if dep.name in seen and seen[dep.name] != alias:
                    raise ValueError(f"deployment {dep.name!r} is defined in both {seen[dep.name]!r} and {alias!r}; "
                                     "deployment names are unique (list the alias as a fallback instead)")
                if dep.name in seen:
                    raise ValueError(f"deployment {dep.name!r} appears twice in {alias!r}")
                seen[dep.name] = alias
            for field in ("fallbacks", "context_window_fallbacks"):
                for target in getattr(model, field):
                    if target == alias:
                        raise ValueError(f"models.{alias}.{field} lists {alias!r} itself")
                    if target not in self.models and target != EXTRACTIVE:
                        raise ValueError(f"models.{alias}.{field} names unknown alias {target!r}")
        if self.default_model and self.default_model not in self.models and self.default_model != EXTRACTIVE:
            raise ValueError(f"default_model {self.default_model!r} is not an alias of models")
        return self

    @property
    def default_alias(self) -> str:
        """The alias used when a request names no model (``extractive`` when there is none)."""
        return self.default_model or next(iter(self.models), EXTRACTIVE)

    def deployments(self) -> list[DeploymentConfig]:
        return [dep for model in self.models.values() for dep in model.deployments]

    def resolve_keys(self, environ: os._Environ[str] | dict[str, str] | None = None) -> Catalogue:
        """Read every ``api_key_env`` (raises CatalogueError naming a missing variable)."""
        environ = os.environ if environ is None else environ
        for alias, model in self.models.items():
            for dep in model.deployments:
                if dep.api_key_env and not dep.api_key:
                    value = environ.get(dep.api_key_env, "")
                    if not value:
                        raise CatalogueError(
                            f"models.{alias}: deployment {dep.name!r} reads its API key from "
                            f"{dep.api_key_env}, which is not set"
                        )
                    dep._api_key = value
        return self


def parse(text: str, source: str = "catalogue") -> Catalogue:
    """A validated catalogue from YAML text, keys resolved. Raises CatalogueError naming the
    offending fields."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogueError(f"{source} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CatalogueError(f"{source} must be a mapping with `models` (and optionally `limits`)")
    try:
        catalogue = Catalogue.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            (f"{'.'.join(str(p) for p in err['loc'])}: " if err["loc"] else "") + err["msg"].removeprefix("Value error, ")
            for err in exc.errors()
        )
        raise CatalogueError(f"{source} is invalid: {problems}") from None
    try:
        return catalogue.resolve_keys()
    except CatalogueError as exc:
        raise CatalogueError(f"{source}: {exc}") from None


def load(path: str | Path) -> Catalogue:
    """:func:`parse` of the file at ``path`` (CatalogueError when it cannot be read)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogueError(f"cannot read the catalogue {path}: {exc.strerror or exc}") from None
    return parse(text, str(path))


def single_deployment(
    *, provider: ProviderKind, model: str, base_url: str, api_key: str, key_variable: str, max_retries: int,
    limits: LimitsConfig | None = None, circuit_breaker: CircuitBreakerConfig | None = None,
) -> Catalogue:
    """The catalogue of a router configured by environment variables only: one alias (the
    upstream model name) with one deployment named after the provider, ``passthrough`` on."""
    if provider == EXTRACTIVE:
        return Catalogue(limits=limits or LimitsConfig(), circuit_breaker=circuit_breaker or CircuitBreakerConfig())
    dep = DeploymentConfig(name=provider, provider=provider, model=model, base_url=base_url, max_retries=max_retries)
    dep._api_key = api_key
    dep._key_variable = key_variable
    return Catalogue(
        default_model=model, models={model: ModelConfig(deployments=[dep])}, passthrough=True,
        limits=limits or LimitsConfig(), circuit_breaker=circuit_breaker or CircuitBreakerConfig(),
    )
