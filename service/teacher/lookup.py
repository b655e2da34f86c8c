"""Draft tokens looked up in a sequence's own history (prompt lookup decoding).

A teacher rewriting a reference answer, or answering a question it was just given, often
copies runs of tokens from its prompt. The last few generated tokens are looked up in
the prompt and the text so far; what followed their latest earlier occurrence is
proposed as the next tokens. The model checks all of them in one forward pass (one row
per token, the weights and the cached keys/values read once) and keeps the ones that
equal its own greedy choice, so the output is greedy decoding's; what speculation saves
is decode steps, each of which streams every weight and key from memory.

Same idea as prompt lookup decoding (Saxena 2023, github.com/apoorvumang/prompt-lookup-
decoding) and vLLM's ``ngram`` speculative method. Defaults (n-grams of 2 to 4 tokens,
3 drafts) come from simulating it on the builtin teacher's own greedy outputs: GSM8K
questions 1.46 tokens per step at 2.0 rows, SDFT general prompts 1.83 at 2.3.
"""

from __future__ import annotations


class NgramLookup:
    def __init__(self, tokens: list[int], min_n: int = 2, max_n: int = 4):
        self.tokens = list(tokens)
        self.min_n, self.max_n = min_n, max_n
        # n -> {n-gram: index just after its latest occurrence}, for n-grams ending
        # before position `indexed`.
        self.after: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}
        self.indexed = 0

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest recent n-gram's previous occurrence."""
        h, last = self.tokens, len(self.tokens) - 1
        # Index the n-grams that end before the last token (the last one's own n-grams
        # are the query; the match must be an earlier occurrence).
        for end in range(self.indexed, last):
            for n, table in self.after.items():
                if end - n + 1 >= 0:
                    table[tuple(h[end - n + 1 : end + 1])] = end + 1
        self.indexed = max(self.indexed, last)
        if k <= 0:
            return []
        for n in range(self.max_n, self.min_n - 1, -1):
            if last - n + 1 < 0:
                continue
            start = self.after[n].get(tuple(h[last - n + 1 :]))
            if start is not None:
                return h[start : start + k]
        return []
