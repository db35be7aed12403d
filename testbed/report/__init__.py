"""report: what finished runs mean side by side, read back from their folders; nothing is
measured here.

Comparisons of schemes (compare: tables, CSV and plots of accuracy, bytes and latency). A
single run's own report.md is written by the run (testbed.run.records). It reads run folders
and never starts a run itself.
"""
