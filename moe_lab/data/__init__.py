"""Data of the course (notebook 01): a character tokenizer, verifiable arithmetic tasks, the
Python-stdlib text corpus, and batches that mix them.

    from moe_lab.data import TOKENIZER, ArithmeticTask, TextSource, TaskSource, Mixture, load_corpus
"""
from moe_lab.data.batches import (Batch, Mixture, TaskSource, TextSource, batch_fn, course_mixture, course_task,
                                   course_training_task)
from moe_lab.data.tasks import ArithmeticTask, Problem
from moe_lab.data.tokenizer import TOKENIZER, CharTokenizer
from moe_lab.data.corpus import load_corpus


__all__ = ["Batch", "Mixture", "TaskSource", "TextSource", "batch_fn", "course_mixture", "course_task", "course_training_task",
           "load_corpus", "ArithmeticTask", "Problem", "TOKENIZER", "CharTokenizer"]
