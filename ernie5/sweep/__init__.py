"""Config-driven ablations: `ernie5 sweep` (a sweep file -> one run per variant and seed) and `ernie5 compare`
(run directories -> a markdown report with statistics over seeds, curves, routing side by side, and for a scaling
ladder a power-law fit of loss against compute).

- `spec.py`    the sweep file, its expansion into runs (variants x seeds, the budget) and up-front validation
- `runner.py`  running the expanded runs through `ernie5 train`, then their `evaluate:` list through
               `ernie5 eval` (skip finished, resume interrupted, --parallel N)
- `collect.py` what one run directory says: final losses, curves, tokens/s, planner sizes, routing summary
- `stats.py`   mean / std over seeds and Welch's t-test against the first variant
- `ladder.py`  the power-law fit of loss against training compute
- `curves.py`  PNG plots (matplotlib, Agg)
- `report.py`  the markdown report (`ernie5 compare`), with the elastic sub-model table when runs have one
- `driver.py`  `ernie5 sweep`: validate, run, report

Nothing else in ernie5 imports this package except the CLI.
"""
