"""The data pipeline: load → order and split → format → tokenize → mask → pack, on Ray Data, cached in the run storage.

Every format becomes rows of ``input_ids`` and ``labels``:

* causal LM: ``labels`` are the token ids where the loss is computed and -100
  elsewhere (prompt tokens unless ``train_on_inputs``; everything but assistant
  turns for chat formats; padding always). Packed rows also carry ``position_ids``
  that restart at 0 for each packed example, which makes transformers build a
  block-diagonal causal mask (no attention across examples).
* sequence classification: ``labels`` is the class id.
* preference pairs (``format: preference``) add ``rejected_ids``/``rejected_labels`` beside the chosen
  ``input_ids``/``labels``; unpaired rows (``format: unpaired``, KTO) add ``desirable`` and ``prompt_len``
  (:mod:`hone.data.pairs`).

Problems in the data (missing column, empty result, bad label, a chat format on a
tokenizer without a chat template) raise :class:`DataError` naming the config key
to change. Truncated and dropped rows are counted in a :class:`DataReport`.
"""

from hone.data.cache import CACHE_DIR, TokenizedData, cache_key, cache_root, prepare_cached
from hone.data.formats import IGNORE_INDEX
from hone.data.preview import preview
from hone.data.prompts import prompt_and_answer, prompt_messages
from hone.data.shards import CachedSplit, local_entry
from hone.data.sources import (
           SPLIT_RULE,
           DataError,
           dataset_fingerprint,
           expand_source,
           held_out_rows,
           load_splits,
           load_tokenizer,
           order_keys,
           tokenizer_digest,
)
from hone.data.tokenize import DataReport, PreparedData, SplitReport, check_sample, collate, prepare_data, to_ray_datasets, tokenize_split

__all__ = [
    "CACHE_DIR", "IGNORE_INDEX", "SPLIT_RULE", "CachedSplit", "DataError", "DataReport", "PreparedData", "SplitReport",
    "TokenizedData", "cache_key", "cache_root", "check_sample", "collate", "dataset_fingerprint", "expand_source",
    "held_out_rows", "load_splits", "load_tokenizer", "local_entry", "order_keys", "prepare_cached", "prepare_data",
    "preview", "prompt_and_answer", "prompt_messages", "to_ray_datasets", "tokenize_split", "tokenizer_digest",
]
