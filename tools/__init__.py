"""Tools around a run, each a script: ``python tools/<name>.py --help``.

    viewer.py        the per-token advantage viewer: every token coloured by the advantage each method gives it
    walkthrough.py   regenerates the numbers in WALKTHROUGH.md from the code (--check: they still match)
    plot.py          learning curves of one or several runs
    recipe.py        the seed's recipe beside a run's, setting by setting (train.py --print-recipe; the README's table)
"""
