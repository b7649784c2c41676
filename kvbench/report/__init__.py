"""Reports from results directories: ``report.md`` (with its PNG figures beside it) and a self-contained
``report.html`` (the same content, figures embedded as base64, no network).

The report reads results files only (never the runner, models or methods), so it can be made anywhere, from
a finished, running, killed or sharded run, and regenerated at any time; the same results always give the
same files. Modules, in the direction the data flows:

- ``tables``: results rows into DataFrames, and every table computed from them (``stats`` for the bootstrap
  intervals, ``paired`` for comparisons on the same samples);
- ``sections`` and ``costs``: tables into blocks, section by section (figures from ``plots``, numbers through
  ``formatting``);
- ``document``: the sections in order, and the files written;
- ``render``: the block types and their Markdown and HTML renderings;
- ``vocabulary``: the names and the row order all of them share.
"""

from kvbench.report.document import build_document, render_report, write_report
from kvbench.report.tables import ReportTables, build_tables, load_bench, load_cells

__all__ = ["ReportTables", "build_document", "build_tables", "load_bench", "load_cells", "render_report",
           "write_report"]
