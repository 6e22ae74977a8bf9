"""Data of the course: a character tokenizer, verifiable arithmetic tasks, the stdlib text corpus
and batching."""
from moe_lab.data.batches import Batch, Mixture, TaskSource, TextSource, batch_fn
from moe_lab.data.corpus import load_corpus
from moe_lab.data.tasks import ArithmeticTask, Problem
from moe_lab.data.tokenizer import TOKENIZER, CharTokenizer

__all__ = ["Batch", "Mixture", "TaskSource", "TextSource", "batch_fn", "load_corpus", "ArithmeticTask", "Problem",
           "TOKENIZER", "CharTokenizer"]
