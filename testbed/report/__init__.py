"""report: what finished runs mean, read back from their folders; nothing is measured here.

Comparisons of schemes (compare: tables, CSV and plots of accuracy, bytes and latency). It
reads run folders (testbed.run.records) and never starts a run itself.
"""
