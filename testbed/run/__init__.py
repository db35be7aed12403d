"""run: one experiment from start to end: nodes started, rounds driven, results written.

The Experiment builds the network (testbed.emu), plans (testbed.plan), launches one node
process per host (launcher, zygote), drives the rounds over its control channel (control),
chooses each round's clients (pool), redoes a round when a node dies (recovery), evaluates
from checkpoints (evaluate) and writes every round as it ends (records). Layers above extend a
run through hooks (hooks), never through its internals. It knows no scenario or report.
"""
