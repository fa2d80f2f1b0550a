"""fedjax_lm.data: text sources -> tokenizer -> per-silo token files -> batches.

info = prepare(data_cfg)                       # once; idempotent
corpus = Corpus.load(data_cfg.corpus_dir)
it = train_iterator(corpus, ["quotes-en"], seq_len=256, batch_size=8, seed=0)
batch = next(it)                               # {'inputs','targets'}: int32[8, 256]
state = it.get_state()                         # JSON-able; it.set_state(state) resumes
evals = eval_batches(corpus, "quotes-en", seq_len=256, batch_size=8, max_batches=4)
"""

from fedjax_lm.data.config import default_data_config
from fedjax_lm.data.corpus import Corpus
from fedjax_lm.data.errors import DataError
from fedjax_lm.data.partition import (
    PARTITIONS,
    partition_dirichlet,
    partition_iid,
    partition_natural,
    silo_mix,
)
from fedjax_lm.data.pipeline import eval_batches, train_iterator
from fedjax_lm.data.build import CorpusInfo, prepare
from fedjax_lm.data.sources import BUILTIN_SOURCES, DEFAULT_SOURCES, make_source
from fedjax_lm.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "BUILTIN_SOURCES",
    "Corpus",
    "CorpusInfo",
    "DEFAULT_SOURCES",
    "DataError",
    "PARTITIONS",
    "Tokenizer",
    "default_data_config",
    "eval_batches",
    "make_source",
    "partition_dirichlet",
    "partition_iid",
    "partition_natural",
    "prepare",
    "silo_mix",
    "train_iterator",
    "train_tokenizer",
]
