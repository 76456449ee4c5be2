"""Budget searches: `as many as fit { ... }` settled by building and measuring candidates.

candidates.py says what a candidate is (recipe text over the statement's prefix), measure.py
builds and measures one, executors.py runs them (a process pool or Ray), engine.py searches
(bisection on the monotone budgets, or every count) and caches, plot.py draws search.png.
"""
