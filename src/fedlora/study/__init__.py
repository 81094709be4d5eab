"""``fedlora study``: a grid of normal runs (methods × settings × seeds) and its report.

* :mod:`fedlora.study.spec` reads a study spec YAML and expands it into cells (validated configs);
* :mod:`fedlora.study.run` runs the cells one after another, resumably;
* :mod:`fedlora.study.report` reads the finished cells back into tables, plots and JSON.
"""

from fedlora.study.report import build_report, write_report
from fedlora.study.run import run_study
from fedlora.study.spec import StudySpec, StudySpecError, load_spec

__all__ = ["StudySpec", "StudySpecError", "build_report", "load_spec", "run_study", "write_report"]
