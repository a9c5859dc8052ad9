"""Test-time search strategies: sample, best-of-N, step-level PRM, PARM, PARM++."""

from cotgen.search.strategies import STRATEGIES, PathTrace, SearchConfig, SearchResult, search, stepwise_sampler

__all__ = ["STRATEGIES", "PathTrace", "SearchConfig", "SearchResult", "search", "stepwise_sampler"]
