"""Channel permutations that let k:n masks keep more, applied without changing the function."""

from .stripe_search import SearchResult, search

__all__ = ["SearchResult", "search"]
