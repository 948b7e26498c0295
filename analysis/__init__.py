"""Analysis of run records: the paper's tables and plots from <results_dir>/runs/*.json (see tables.py)."""
