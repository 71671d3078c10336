"""PII masking (:mod:`hone.privacy`): precision and recall on a labelled set, ordinary text left alone, pseudonyms that
are deterministic and reversible by key, the settings' validation, and log redaction."""

from __future__ import annotations

import io
import logging
import random

import pytest

from hone.config import PiiConfig
from hone.privacy import RedactingFilter, StreamRedactor, mask_rows, masker, redact, redact_logging, reveal

# Planted values: each (value, entity). Valid card numbers pass Luhn, IBANs their checksum; the keys are in the issuers'
# formats (documentation examples, not live keys).
PLANTED = [
    ("jane.doe@example.com", "EMAIL_ADDRESS"), ("k.o'brien+news@mail.co.uk", "EMAIL_ADDRESS"), ("ops@hone.dev", "EMAIL_ADDRESS"),
    ("+1 (415) 555-0132", "PHONE_NUMBER"), ("+44 20 7946 0958", "PHONE_NUMBER"), ("+49 30 901820", "PHONE_NUMBER"),
    ("(212) 555-0187", "PHONE_NUMBER"),
    ("4111 1111 1111 1111", "CREDIT_CARD"), ("5500-0000-0000-0004", "CREDIT_CARD"), ("378282246310005", "CREDIT_CARD"),
    ("DE89 3704 0044 0532 0130 00", "IBAN_CODE"), ("GB82 WEST 1234 5698 7654 32", "IBAN_CODE"),
    ("FR1420041010050500013M02606", "IBAN_CODE"),
    ("192.168.10.7", "IP_ADDRESS"), ("8.8.4.4", "IP_ADDRESS"), ("2001:db8:85a3::8a2e:370:7334", "IP_ADDRESS"),
    ("AKIAIOSFODNN7EXAMPLE", "SECRET"), ("ghp_0123456789abcdefghijABCDEFGHIJ012345", "SECRET"),
    ("hf_abcdefghijklmnopqrstuvwxyzABCDEFGH", "SECRET"), ("sk-proj-AbCdEfGhIjKlMnOpQrStUvWx0123", "SECRET"),
    ("xoxb-1234567890-abcdefghijkl", "SECRET"),
]
TEMPLATES = ["Please reach me at {} before Friday.", "The value was {}, as the log showed.", "{} is what they gave us.",
             "Customer note: contact {} for the refund."]
# Ordinary text with numbers, dates, versions and prices, and values that look like entities but fail their checksum:
# nothing here may change.
ORDINARY = [
    "A 1999 film that grossed $20,000,000 in 2 weeks; rated 8.5/10, runtime 120 minutes.",
    "Version 3.2.1 shipped on 2024-05-17 with 42 fixes and a 15% speed-up.",
    "The invalid card 4111 1111 1111 1112 fails its checksum.",
    "IBAN DE00 3704 0044 0532 0130 00 has a wrong check digit.",
    "Order #55123 of 3 items at 19.99 each; ISBN 978-3-16-148410-0.",
    "Meet at 10:30 in room 404; the score was 3-2 after 90 minutes.",
    "An emoticon :-) and a ratio 16:9, a sequel to the 2012 remake.",
    "It never rises above its premise, but the cast is charming.",
]


def labelled_set(seed: int = 0) -> list[tuple[str, list[tuple[str, str]]]]:
    """Each planted value in every template (some rows carry two), then the ordinary rows with nothing to find."""
    rng = random.Random(seed)
    rows = [(t.format(v), [(v, e)]) for v, e in PLANTED for t in TEMPLATES]
    for _ in range(20):
        (a, ea), (b, eb) = rng.sample(PLANTED, 2)
        rows.append((f"Write to {a} or use {b} instead.", [(a, ea), (b, eb)]))
    return rows + [(t, []) for t in ORDINARY]


def test_precision_and_recall_on_a_labelled_set():
    """Each planted value becomes its entity's placeholder and nothing else in the row changes."""
    m = masker(PiiConfig())
    tp: dict[str, int] = {}
    fn: dict[str, int] = {}
    fp = 0
    misses = []
    for text, planted in labelled_set():
        masked, counts = m.mask(text)
        expected = text
        for value, entity in planted:
            expected = expected.replace(value, f"<{entity}>")
        for value, entity in planted:
            hit = f"<{entity}>" in masked and value not in masked
            (tp if hit else fn)[entity] = (tp if hit else fn).get(entity, 0) + 1
        if masked != expected:
            misses.append((text, masked))
        fp += max(0, sum(counts.values()) - len(planted))
    found, missed = sum(tp.values()), sum(fn.values())
    precision, recall = found / max(found + fp, 1), found / (found + missed)
    print(f"PII labelled set: {found + missed} planted, recall {recall:.3f}, precision {precision:.3f}, per entity "
          + ", ".join(f"{e} {tp.get(e, 0)}/{tp.get(e, 0) + fn.get(e, 0)}" for e in sorted({e for _, e in PLANTED})))
    assert recall == 1.0 and precision == 1.0, misses[:5]
    assert not misses, misses[:5]


def test_ordinary_reviews_are_left_untouched():
    from hone import assets

    reviews = assets.load_builtin_dataset("builtin:rotten-tomatoes", "classification")["validation"]["text"]
    rows, counts = mask_rows([{"text": t} for t in reviews], PiiConfig())
    changed = [r["text"] for r, c in zip(rows, counts) if c]
    print(f"PII on {len(reviews)} Rotten Tomatoes reviews: {len(changed)} changed")
    assert not changed, changed[:3]


def test_rows_are_masked_everywhere_but_their_label():
    rows, counts = mask_rows([{"messages": [{"role": "user", "content": "mail ops@hone.dev"}], "label": "ops@hone.dev", "n": 4}],
                             PiiConfig(), skip=("label",))
    assert rows == [{"messages": [{"role": "user", "content": "mail <EMAIL_ADDRESS>"}], "label": "ops@hone.dev", "n": 4}]
    assert counts == [{"EMAIL_ADDRESS": 1}]
    assert masker(PiiConfig(entities=["PHONE_NUMBER"])).mask("ops@hone.dev, +1 (415) 555-0132")[0] == "ops@hone.dev, <PHONE_NUMBER>"
    assert redact(redact("call +1 (415) 555-0132")) == "call <PHONE_NUMBER>"  # masking twice changes nothing


def test_a_streamed_answer_is_masked_in_runs_exactly_as_a_whole_one():
    """``mask_pii: output`` on a stream: the labelled set as one long answer (a private key block and a long word in it),
    cut into pieces of 1 to 12 characters, comes out as runs that join to the whole answer masked at once; no planted value
    is ever released, and text is released before the answer ends."""
    key = "-----BEGIN RSA PRIVATE KEY-----\n" + "MIIEowIBAAKCAQEA7Vq3e1mQ9Zx0Tn4KfWq8sY2b\n" * 4 + "-----END RSA PRIVATE KEY-----"
    answer = " ".join(text for text, _ in labelled_set()) + f" Keep this safe: {key} and " + "x" * 300 + " the end."
    whole = redact(answer)
    assert "<SECRET>" in whole and "PRIVATE KEY" not in whole
    rng = random.Random(0)
    redactor, runs, i = StreamRedactor(), [], 0
    while i < len(answer):
        step = rng.randint(1, 12)
        if redactor.push(answer[i:i + step]):
            runs.append(redactor.release())
        i += step
    released_early = "".join(runs)
    runs.append(redactor.flush())
    assert "".join(runs) == whole
    assert len(released_early) > len(whole) // 2
    for value, _ in PLANTED:
        assert value not in released_early
    assert StreamRedactor().flush() == "" and StreamRedactor.HOLD >= max(len(v) for v, e in PLANTED if " " in v)


def test_a_stream_that_breaks_still_sends_what_was_held_back_masked_before_its_error():
    """The ingress's masked stream (:func:`hone.serving.wire.masked_events`) over two choices' events: each choice's text
    is masked in runs, and when the replica's stream breaks, what each held back goes out masked before the error."""
    import asyncio

    from hone.serving.wire import masked_events

    words = "Reach jane.doe@example.com or +44 20 7946 0958 about the refund; it was filed last week by the team. " * 2

    async def replica():
        for i in range(0, len(words), 5):
            for index in (0, 1):
                yield {"index": index, "text": words[i:i + 5], "completion_tokens": i // 5 + 1, "finish_reason": None}
        yield {"error": "the model replica stopped", "status": 503}

    async def collect():
        return [e async for e in masked_events(replica())]

    events = asyncio.run(collect())
    assert events[-1] == {"error": "the model replica stopped", "status": 503}
    for index in (0, 1):
        texts = [e["text"] for e in events[:-1] if e["index"] == index]
        assert "".join(texts) == redact(words) and len([t for t in texts if t]) >= 2
        assert "".join(texts).count("<EMAIL_ADDRESS>") == 2 and "jane.doe" not in "".join(texts)


def test_pseudonyms_are_deterministic_and_reversible_by_key(monkeypatch):
    cfg = PiiConfig(mode="pseudonymise", key_env="HONE_TEST_PII_KEY")
    monkeypatch.delenv("HONE_TEST_PII_KEY", raising=False)
    with pytest.raises(ValueError, match=r"\$HONE_TEST_PII_KEY"):
        masker(cfg)
    monkeypatch.setenv("HONE_TEST_PII_KEY", "ab" * 32)
    text = "jane.doe@example.com wrote; cc jane.doe@example.com and ops@hone.dev, tel +44 20 7946 0958"
    masked = masker(cfg).mask(text)[0]
    words = masked.split()
    first, second, other = words[0], words[3], words[5].rstrip(",")
    assert first.startswith("<EMAIL_ADDRESS_") and first == second != other  # the same person, the same placeholder
    assert "jane" not in masked and "7946" not in masked and words[-1].startswith("<PHONE_NUMBER_")
    assert reveal(masked, cfg) == text
    assert masker(cfg).mask(masked)[0] == masked  # a pseudonymised text is masked already
    monkeypatch.setenv("HONE_TEST_PII_KEY", "cd" * 32)  # another key: other placeholders
    assert masker(cfg).mask(text)[0].split()[0] != first


def test_entities_that_need_a_model_are_refused_at_validation():
    from hone.config import JobConfigError, validate_job

    from tests.helpers import make_job

    with pytest.raises(JobConfigError) as e:
        validate_job({"name": "t", "model": {"name": "builtin:tiny-llama"}, "data": {
            "source": "builtin:rotten-tomatoes", "format": "alpaca", "mask_pii": {"entities": ["EMAIL_ADDRESS", "PERSON"]}}})
    assert "data.mask_pii.entities" in str(e.value) and "NER model" in str(e.value)
    assert make_job(data={"mask_pii": True}).data.mask_pii == PiiConfig()


def test_log_lines_and_tracebacks_are_redacted(monkeypatch):
    stream = io.StringIO()
    log = logging.getLogger("hone.test.redact")
    handler = logging.StreamHandler(stream)
    log.addHandler(handler)
    log.propagate = False
    try:
        redact_logging(("hone.test.redact",))
        log.warning("request from %s failed", "jane.doe@example.com")
        try:
            raise ValueError("card 4111 1111 1111 1111 declined")
        except ValueError:
            log.exception("request failed")
        log.warning("a malformed call: %s %s", "ops@hone.dev")  # one argument short: logged (masked), never raised
        # Ray Serve's access lines hold no request content: passed as they are, unless they carry the client's address
        access = logging.makeLogRecord({"msg": "GET /v1 200 3.1ms", "serve_access_log": True})
        assert RedactingFilter().filter(access) and not hasattr(access, "hone_redacted")  # not masked on the event loop
        monkeypatch.setenv("RAY_SERVE_LOG_CLIENT_ADDRESS", "1")
        log.warning("203.0.113.9:5123 POST /v1/chat/completions 200 9.5ms", extra={"serve_access_log": True})
    finally:
        log.removeHandler(handler)
    out = stream.getvalue()
    assert "request from <EMAIL_ADDRESS> failed" in out and "card <CREDIT_CARD> declined" in out and "Traceback" in out
    assert "jane.doe" not in out and "4111" not in out
    assert "a malformed call" in out and "ops@hone.dev" not in out and "<EMAIL_ADDRESS>" in out
    assert "203.0.113.9" not in out and "<IP_ADDRESS>:5123 POST /v1/chat/completions 200" in out
