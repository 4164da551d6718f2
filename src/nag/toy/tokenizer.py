"""Byte-pair-encoding merges for small closed vocabularies (the built-in model's tokenizer, test tokenizers)."""

from __future__ import annotations

import heapq

__all__ = ["bpe_merges"]


def bpe_merges(words: list[list[str]]) -> list[tuple[str, str]]:
    """Deterministic BPE merges that make every word a single symbol.

    ``words`` are symbol lists (e.g. characters with ``"</w>"`` on the last one); every word counts
    once, the most frequent pair is merged first and ties are broken lexicographically, until each
    word is one symbol, so each word encodes to exactly one token.
    """
    words = [list(w) for w in words]
    counts: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}

    def pairs(w: list[str]) -> list[tuple[str, str]]:
        return list(zip(w[:-1], w[1:]))

    def account(i: int, sign: int) -> set[tuple[str, str]]:
        touched = set()
        for p in pairs(words[i]):
            counts[p] = counts.get(p, 0) + sign
            if sign > 0:
                where.setdefault(p, set()).add(i)
            touched.add(p)
        return touched

    for i in range(len(words)):
        account(i, +1)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap:
        negative, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -negative or negative == 0:
            continue
        merges.append(pair)
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            w = words[i]
            if pair not in set(pairs(w)):
                continue
            touched |= account(i, -1)
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
                    out.append(w[j] + w[j + 1])
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            touched |= account(i, +1)
        counts[pair] = 0
        for p in sorted(touched):
            if counts.get(p, 0) > 0:
                heapq.heappush(heap, (-counts[p], p))
    return merges
