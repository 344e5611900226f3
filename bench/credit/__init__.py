"""The instrument of bench/bench_credit.py: the credit world (world.py) and the varied demonstrator that gives a
policy trained from scratch its prior (demonstrator.py). Benchmark machinery, not part of the training path."""
