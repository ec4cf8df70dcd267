"""`cmrp sweep`: grids of recipe variants x seeds, each cell a real `cmrp fit` + `cmrp eval`, run by a
launcher (local, parallel, submitit/SLURM), recorded under one MLflow parent run, and tabulated
(mean ± std, 95 % intervals, paired deltas, claims, plots).

Modules: `spec` (the sweep file), `plan` (cells, fingerprints, status), `cell` (one cell's process),
`launchers`, `run` (parent run, waves, table files), `table` (statistics, Markdown), `report` (HTML, plots).
"""

__all__: list[str] = []
