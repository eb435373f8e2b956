"""The tiny vocabulary and the synthetic data of the language-model setting.

Token ids, in order: four specials (``<pad>``, ``<bos>``, ``continue:``,
``answer:``), the question words ``q0 ..``, the answer words ``a0 ..`` and the
number tokens ``0 ..``. A *number prompt* is ``<bos> continue: n1 n2 n3``; a
*question* is ``<bos> qi qj qk answer:`` followed by one answer word. Nothing
is downloaded: the vocabulary is data, and so is every sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import torch
from torch import Tensor

__all__ = ["IGNORE", "Vocab"]

IGNORE = -100
"""The label of a position no loss reads."""

_SPECIALS = ("<pad>", "<bos>", "continue:", "answer:")


@dataclass(frozen=True)
class Vocab:
    """Token ids of the setting.

    Attributes:
        questions: Question words; a question is three distinct ones in some order.
        answers: Answer words; answer ``trait`` is the teacher's preferred one.
        numbers: Number tokens ``0 .. numbers - 1``.
        trait: Index of the trait answer among the answer words.
        question_words: Question words per question.
    """

    questions: int = 8
    answers: int = 8
    numbers: int = 256
    trait: int = 0
    question_words: int = 3

    @property
    def size(self) -> int:
        """The vocabulary size."""
        return len(_SPECIALS) + self.questions + self.answers + self.numbers

    @property
    def bos(self) -> int:
        """``<bos>``."""
        return 1

    @property
    def number_cue(self) -> int:
        """``continue:``, which opens a number prompt."""
        return 2

    @property
    def answer_cue(self) -> int:
        """``answer:``, after which the model answers a question."""
        return 3

    @property
    def first_question(self) -> int:
        """Id of ``q0``."""
        return len(_SPECIALS)

    @property
    def first_answer(self) -> int:
        """Id of ``a0``."""
        return self.first_question + self.questions

    @property
    def first_number(self) -> int:
        """Id of the number ``0``."""
        return self.first_answer + self.answers

    @property
    def trait_token(self) -> int:
        """Id of the trait answer."""
        return self.first_answer + self.trait

    def tokens(self) -> list[str]:
        """Every token's text, by id."""
        return [
            *_SPECIALS,
            *(f"q{i}" for i in range(self.questions)),
            *(f"a{i}" for i in range(self.answers)),
            *(str(i) for i in range(self.numbers)),
        ]

    def decode(self, ids: Tensor) -> str:
        """The text of a 1-D sequence of ids, space-separated."""
        names = self.tokens()
        return " ".join(names[int(i)] for i in ids)

    def is_number(self, ids: Tensor) -> Tensor:
        """Whether each id is a number token; same shape as ``ids``."""
        return ids >= self.first_number

    def all_questions(self) -> Tensor:
        """Every question prompt, ``(question, token)``: ``<bos> qi qj qk answer:``."""
        words = range(self.first_question, self.first_question + self.questions)
        rows = [
            [self.bos, *perm, self.answer_cue] for perm in permutations(words, self.question_words)
        ]
        return torch.tensor(rows)

    def answered(self, questions: Tensor, answers: Tensor) -> dict[str, Tensor]:
        """Questions followed by answer words, labelled on the answer only.

        Args:
            questions: ``(example, token)`` question prompts.
            answers: ``(example,)`` answer indices (``0 .. answers - 1``).

        Returns:
            ``input_ids`` and ``labels``, ``(example, token + 1)``; ``labels`` is
            :data:`IGNORE` except at the answer.
        """
        ids = torch.cat([questions, (self.first_answer + answers)[:, None]], dim=1)
        labels = torch.full_like(ids, IGNORE)
        labels[:, -1] = ids[:, -1]
        return {"input_ids": ids, "labels": labels}

    def number_prompts(self, n: int, length: int, generator: torch.Generator) -> Tensor:
        """``n`` number prompts ``<bos> continue: n1 .. n_length`` of uniform numbers."""
        numbers = torch.randint(self.numbers, (n, length), generator=generator)
        head = torch.tensor([self.bos, self.number_cue]).expand(n, 2)
        return torch.cat([head, self.first_number + numbers], dim=1)

    def rule_sequences(
        self, n: int, length: int, generator: torch.Generator, noise: float = 0.2
    ) -> Tensor:
        """Number sequences of the base model's pretraining, ``(n, 2 + length)``.

        Each sequence steps by its own stride (1 to 8) modulo ``numbers``; each
        number is replaced by a uniform one with probability ``noise``. This
        gives the base model something to learn about numbers, so that the
        teacher's number sequences have a distribution a fine-tune can shift.
        """
        start = torch.randint(self.numbers, (n, 1), generator=generator)
        stride = torch.randint(1, 9, (n, 1), generator=generator)
        values = (start + stride * torch.arange(length)) % self.numbers
        swap = torch.rand(n, length, generator=generator) < noise
        other = torch.randint(self.numbers, (n, length), generator=generator)
        values = torch.where(swap, other, values)
        head = torch.tensor([self.bos, self.number_cue]).expand(n, 2)
        return torch.cat([head, self.first_number + values], dim=1)
