"""Channel permutations that let k:n masks keep more, applied without changing the function."""

from .apply import GroupReport, PermutationReport, find_groups, permute
from .stripe_search import SearchResult, search

__all__ = ["GroupReport", "PermutationReport", "SearchResult", "find_groups", "permute", "search"]
