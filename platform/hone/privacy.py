"""PII masking: personal data found with Microsoft Presidio's analyzer and replaced with its anonymizer, offline.

What runs (no model, no network): Presidio's pattern recognizers for e-mail addresses (their domain checked against
tldextract's bundled suffix list, never fetched), phone numbers (Google's phonenumbers library), card numbers (Luhn
checksum), IBANs (checksum) and IP addresses, and hone's ``SECRET`` recognizer: Presidio ``Pattern`` s for API keys and
tokens in the formats gitleaks' default rules describe (AWS, GitHub, Slack, Google, OpenAI, Hugging Face, Stripe, private
key blocks, JWTs). Presidio's NLP engine is replaced by one that returns no tokens, so no spaCy model is loaded (or
downloaded): names and places, which need its NER, are not found.

Data: :func:`mask_rows` masks every string of a row (nested ones too) but the class label, before any tokeniser sees
it, and counts what it replaced per entity. Serving: :func:`redact` masks what hone writes about a request, and
:class:`StreamRedactor` a streamed answer (``mask_pii: output``).
``pseudonymise`` replaces a value with a deterministic AES-SIV encryption of it under a key only the operator holds
(:func:`reveal` reverses it): the same e-mail address is the same placeholder in every row.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import re
from collections import Counter
from typing import Any

from hone.config.privacy import OFFLINE_ENTITIES, PiiConfig

__all__ = ["OFFLINE_ENTITIES", "PiiConfig", "PiiMasker", "RedactingFilter", "StreamRedactor", "mask_rows", "masker", "redact",
           "redact_logging", "reveal", "settings_identity"]

# gitleaks' default rules (github.com/gitleaks/gitleaks, config/gitleaks.toml), the formats issued today.
SECRET_PATTERNS = {
    "aws-access-key": r"\b(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16}\b",
    "github-token": r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b",
    "github-fine-grained": r"\bgithub_pat_[A-Za-z0-9_]{82}\b",
    "slack-token": r"\bxox[abposr]-[0-9A-Za-z-]{10,}\b",
    "google-api-key": r"\bAIza[0-9A-Za-z_-]{35}\b",
    "openai-key": r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}\b",
    "huggingface-token": r"\bhf_[A-Za-z]{34}\b",
    "stripe-key": r"\b(?:sk|rk)_(?:test|live|prod)_[0-9A-Za-z]{10,99}\b",
    "private-key": r"-----BEGIN[A-Z ]{0,20} PRIVATE KEY-----[\s\S]{16,}?-----END[A-Z ]{0,20} PRIVATE KEY-----",
    "jwt": r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\b",
}
_PSEUDONYM = re.compile(rf"<({'|'.join(OFFLINE_ENTITIES)})_([A-Z2-7]{{20,}})>")
_KEY_END = re.compile(r"-----END[A-Z ]{0,20} PRIVATE KEY-----")
_PLACEHOLDER = re.compile(rf"<(?:{'|'.join(OFFLINE_ENTITIES)})(?:_[A-Z2-7]{{20,}})?>")


def _engine(entities: tuple[str, ...], threshold: float) -> Any:
    """A Presidio AnalyzerEngine with the offline recognizers for ``entities`` and an NLP engine that loads nothing."""
    import tldextract
    from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NlpArtifacts, NlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
    )

    class NoNlp(NlpEngine):  # pattern recognizers need no tokens; context words then never raise a score
        def load(self) -> None: ...
        def is_loaded(self) -> bool: return True
        def process_text(self, text: str, language: str) -> Any: return NlpArtifacts([], [], [], [], self, language)
        def process_batch(self, texts: Any, language: str, **_: Any) -> Any:
            return ((t, self.process_text(t, language)) for t in texts)
        def is_stopword(self, word: str, language: str) -> bool: return False
        def is_punct(self, word: str, language: str) -> bool: return False
        def get_supported_entities(self) -> list[str]: return []
        def get_supported_languages(self) -> list[str]: return ["en"]

    offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)  # the bundled public suffix list, no fetch

    class OfflineEmail(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return offline(pattern_text.rsplit("@", 1)[-1]).fqdn != ""

    made = {"EMAIL_ADDRESS": OfflineEmail, "PHONE_NUMBER": PhoneRecognizer, "CREDIT_CARD": CreditCardRecognizer,
            "IBAN_CODE": IbanRecognizer, "IP_ADDRESS": IpRecognizer,
            "SECRET": lambda: PatternRecognizer("SECRET", name="HoneSecretRecognizer",
                                                patterns=[Pattern(k, v, 0.9) for k, v in SECRET_PATTERNS.items()])}
    registry = RecognizerRegistry(supported_languages=["en"])
    for entity in entities:
        registry.add_recognizer(made[entity]())
    return AnalyzerEngine(registry=registry, nlp_engine=NoNlp(), default_score_threshold=threshold, supported_languages=["en"])


def _key(env: str) -> bytes:
    value = os.environ.get(env, "")
    try:
        key = bytes.fromhex(value)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError(f"mask_pii: pseudonymise needs a 32-byte key as 64 hex digits in ${env} on every node "
                         "(python -c 'import secrets; print(secrets.token_hex(32))')")
    return key


class PiiMasker:
    """Finds and replaces the configured entities in text (one per process and setting: :func:`masker`)."""

    def __init__(self, cfg: PiiConfig):
        from presidio_anonymizer import AnonymizerEngine

        self.cfg = cfg
        self.entities = list(cfg.entities)
        self.analyzer = _engine(tuple(cfg.entities), cfg.score_threshold)
        self.anonymizer = AnonymizerEngine()
        self.siv = None
        if cfg.mode == "pseudonymise":
            from cryptography.hazmat.primitives.ciphers.aead import AESSIV

            self.siv = AESSIV(_key(cfg.key_env))

    def _operators(self, found: Any) -> dict[str, Any]:
        from presidio_anonymizer.entities import OperatorConfig

        def pseudonym(entity: str) -> Any:
            def apply(value: str) -> str:
                token = base64.b32encode(self.siv.encrypt(value.encode(), [entity.encode()])).decode().rstrip("=")
                return f"<{entity}_{token}>"
            return apply

        if self.siv is None:
            return {e: OperatorConfig("replace", {"new_value": f"<{e}>"}) for e in {f.entity_type for f in found}}
        return {e: OperatorConfig("custom", {"lambda": pseudonym(e)}) for e in {f.entity_type for f in found}}

    def find(self, text: str) -> list[Any]:
        """Presidio's findings in ``text`` (start, end, entity_type), but those inside a placeholder already there."""
        if not text:
            return []
        found = self.analyzer.analyze(text, language="en", entities=self.entities)
        kept = [(m.start(), m.end()) for m in _PLACEHOLDER.finditer(text)]  # masked already: masking again changes nothing
        return [f for f in found if not any(f.start < b and a < f.end for a, b in kept)]

    def replace(self, text: str, found: list[Any]) -> tuple[str, Counter[str]]:
        """(``text`` with ``found`` replaced, how many of each entity)."""
        if not found:
            return text, Counter()
        out = self.anonymizer.anonymize(text, found, operators=self._operators(found))
        return out.text, Counter(item.entity_type for item in out.items)

    def mask(self, text: str) -> tuple[str, Counter[str]]:
        """(the text with every finding replaced, how many of each entity)."""
        return self.replace(text, self.find(text))

    def mask_value(self, value: Any, counts: Counter[str]) -> Any:
        if isinstance(value, str):
            masked, found = self.mask(value)
            counts.update(found)
            return masked
        if isinstance(value, list):
            return [self.mask_value(v, counts) for v in value]
        if isinstance(value, dict):
            return {k: self.mask_value(v, counts) for k, v in value.items()}
        return value


@functools.lru_cache(maxsize=4)
def _masker(settings: str, key: str) -> PiiMasker:
    return PiiMasker(PiiConfig.model_validate(json.loads(settings)))


def _key_text(cfg: PiiConfig) -> str:
    """The pseudonym key's text from the environment ("" when masking, or when it is unset)."""
    return os.environ.get(cfg.key_env, "") if cfg.mode == "pseudonymise" else ""


def masker(cfg: PiiConfig) -> PiiMasker:
    """This process's masker for ``cfg`` and its key (Presidio's engines are built once)."""
    return _masker(json.dumps(cfg.model_dump(), sort_keys=True), _key_text(cfg))


def settings_identity(cfg: PiiConfig) -> dict[str, Any]:
    """What decides the masked text, for cache keys: the settings and, for pseudonyms, which key (a hash of it, never the
    key itself)."""
    import hashlib

    key = _key_text(cfg)
    return {**cfg.model_dump(), "key": hashlib.sha256(f"hone-pii\0{key}".encode()).hexdigest()[:12] if key else None}


def mask_rows(rows: list[dict[str, Any]], cfg: PiiConfig, skip: tuple[str, ...] = ()) -> tuple[list[dict[str, Any]], list[dict[str, int]]]:
    """Every row with each string (nested in lists and dicts too) masked, but the columns in ``skip`` (a class label);
    and, per row, how many of each entity were replaced."""
    m = masker(cfg)
    out, counts = [], []
    for row in rows:
        found: Counter[str] = Counter()
        out.append({k: v if k in skip else m.mask_value(v, found) for k, v in row.items()})
        counts.append(dict(found))
    return out, counts


def redact(text: str, cfg: PiiConfig | None = None) -> str:
    """``text`` with the entities masked (all of them by default): what serving writes about a request."""
    return masker(cfg or PiiConfig(mode="mask")).mask(text)[0] if text else text


class StreamRedactor:
    """Masks a text that arrives in pieces, a streamed answer (``mask_pii: output``), releasing it in masked runs.

    Text is released up to a white space that at least :attr:`HOLD` characters follow, and never inside anything found
    in what is held, nor past an unfinished private-key block. An entity without white space cannot span a cut, and
    those with some (phone, card and IBAN numbers) are shorter than HOLD characters, so they are whole, and found, in
    what is held when a cut could split them; a private key is held until its block ends. The released runs joined are
    the whole text masked at once; :meth:`flush` masks the rest when the answer ends."""

    HOLD = 64

    def __init__(self, cfg: PiiConfig | None = None):
        self.cfg = cfg or PiiConfig(mode="mask")
        self.pending = ""

    @property
    def masker(self) -> PiiMasker:
        return masker(self.cfg)  # built once per process, on first use (in :meth:`release` or :meth:`flush`)

    def push(self, text: str) -> bool:
        """Add ``text``; whether enough is held to release some (then call :meth:`release`, off the event loop)."""
        self.pending += text
        return len(self.pending) >= 2 * self.HOLD

    def release(self) -> str:
        """The masked run that can go now ("" when none can)."""
        held = self.pending
        spaces = [m.end() for m in re.finditer(r"\s+", held[: len(held) - self.HOLD + 1])]
        if not spaces:
            return ""
        cut, m = spaces[-1], self.masker
        found = m.find(held)
        while (inside := [f.start for f in found if f.start < cut < f.end]):
            cut = min(inside)
        opened = held.rfind("-----BEGIN", 0, cut)
        if opened != -1 and not _KEY_END.search(held, opened):
            cut = opened
        if cut == 0:
            return ""
        self.pending = held[cut:]
        return m.replace(held[:cut], [f for f in found if f.end <= cut])[0]

    def flush(self) -> str:
        """The rest, masked (the answer ended)."""
        rest, self.pending = self.pending, ""
        return self.masker.mask(rest)[0] if rest else ""


def reveal(text: str, cfg: PiiConfig) -> str:
    """A pseudonymised text with each placeholder decrypted back to its value (needs ``cfg.key_env``'s key)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESSIV

    siv = AESSIV(_key(cfg.key_env))

    def back(match: re.Match[str]) -> str:
        token = match.group(2)
        raw = base64.b32decode(token + "=" * (-len(token) % 8))
        return siv.decrypt(raw, [match.group(1).encode()]).decode()

    return _PSEUDONYM.sub(back, text)


class RedactingFilter(logging.Filter):
    """Masks a log record's message and traceback before any handler writes it (``redact_logs``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "hone_redacted", False):
            return True
        if getattr(record, "serve_access_log", False) and os.environ.get("RAY_SERVE_LOG_CLIENT_ADDRESS", "0") != "1":
            return True  # Ray Serve's access line: method, route, status, latency; no request content (the client's IP only
            # with RAY_SERVE_LOG_CLIENT_ADDRESS=1): not masked on the event loop of every request
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed log call must not become an error where it was made
            message = f"{record.msg} {record.args}"
        try:
            record.msg, record.args = redact(message), None
            if record.exc_info:
                import traceback

                record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
                record.exc_info = None
        except Exception as e:  # noqa: BLE001 - never log what could not be masked
            record.msg, record.args, record.exc_info, record.exc_text = f"[hone: a log line could not be redacted: {type(e).__name__}]", \
                None, None, None
        record.hone_redacted = True
        return True


def redact_logging(loggers: tuple[str, ...] = ("", "ray", "ray.serve", "hone")) -> None:
    """Mask personal data in everything this process logs through ``loggers``' handlers (root, Ray, Ray Serve, hone):
    access lines, errors and tracebacks. Idempotent."""
    masked = RedactingFilter()
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(masked)
