"""PII masking settings (``data.mask_pii``): which entities :mod:`hone.privacy` finds and what replaces them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from hone.config.base import Section

__all__ = ["OFFLINE_ENTITIES", "PiiConfig"]

OFFLINE_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "SECRET")
"""What hone finds with no model and no network: Presidio's pattern recognizers (e-mail, phone through the phonenumbers
library, card numbers with their Luhn checksum, IBANs with theirs, IPv4/IPv6) and hone's ``SECRET`` patterns (API keys,
tokens, private keys). Names and places (``PERSON``, ``LOCATION``) need an NER model, which no offline install brings."""


class PiiConfig(Section):
    """Personal data masked in every row before it is tokenised (``mask_pii: true``, or this section).

    Training rows are masked on Ray Data, evaluation rows where they are read; the data report counts what was masked
    per entity, and ``hone data preview`` shows it."""

    entities: list[str] = Field(default_factory=lambda: list(OFFLINE_ENTITIES))
    """Entity types to mask (default: all of them)."""
    mode: Literal["mask", "pseudonymise"] = "mask"
    """``mask``: each finding becomes ``<ENTITY>``. ``pseudonymise``: ``<ENTITY_token>``, the token a deterministic
    encryption of the value under ``key_env``'s key (AES-SIV): the same value gets the same placeholder in every row and
    run with that key (referential integrity), and whoever holds the key can reverse it (``hone.privacy.reveal``)."""
    key_env: str = "HONE_PII_KEY"
    """``pseudonymise``: the environment variable holding the key, 64 hex digits (``python -c "import secrets;
    print(secrets.token_hex(32))"``).
    It is never written to a YAML, a run or a runtime_env: each Ray node reads it from its own environment."""
    score_threshold: float = Field(default=0.4, ge=0.0, le=1.0)
    """Findings Presidio scores below this are left alone (card numbers and IBANs that fail their checksum score 0)."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {} if value is True else value

    @field_validator("entities")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [e for e in v if e not in OFFLINE_ENTITIES]
        if unknown:
            raise ValueError(f"cannot find {unknown} offline: hone masks {list(OFFLINE_ENTITIES)} (names and places need an NER "
                             "model, which no offline install brings)")
        if not v:
            raise ValueError("name at least one entity, or drop mask_pii")
        return v
