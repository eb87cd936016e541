"""Fixtures of the deployment tests: the chart rendered once per ci/*-values.yaml variant."""

from __future__ import annotations

import pytest

from tests.deploy.chart import VARIANTS, Manifests, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, Manifests]:
    """{variant: Manifests} for minimal, production and dev."""
    return {variant: render(variant) for variant in VARIANTS}


@pytest.fixture(params=VARIANTS)
def variant(request) -> str:
    return request.param


@pytest.fixture
def manifests(rendered, variant) -> Manifests:
    return rendered[variant]
