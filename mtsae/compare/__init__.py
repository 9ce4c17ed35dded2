"""The comparison of trained SAEs behind ``mtsae compare`` (its command line: :mod:`mtsae_app.compare`).

Modules: :mod:`~mtsae.compare.config` (the YAML schema), :mod:`~mtsae.compare.runner` (one ``train.py fit``
process per run, ``--jobs`` at a time, resumable), :mod:`~mtsae.compare.curves` (validation curves from
TensorBoard event files), :mod:`~mtsae.compare.results` (finished runs), :mod:`~mtsae.compare.frontier`
(L0-matched interpolation, statistics over seeds and verdicts), :mod:`~mtsae.compare.convergence` (how runs
ended, whether their metrics had settled), :mod:`~mtsae.compare.frontier_report` (the frontier sections
of a report) and :mod:`~mtsae.compare.report` (``report.md``).
"""

from mtsae.compare.config import CompareConfig, RunSpec, load_compare_config
from mtsae.compare.frontier import frontier_analysis
from mtsae.compare.report import write_report
from mtsae.compare.results import RunResult, collect_results
from mtsae.compare.runner import run_dir, train_all, train_args, train_run

__all__ = [
    "CompareConfig",
    "RunResult",
    "RunSpec",
    "collect_results",
    "frontier_analysis",
    "load_compare_config",
    "run_dir",
    "train_all",
    "train_args",
    "train_run",
    "write_report",
]
