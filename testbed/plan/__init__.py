"""plan: what a run will be, as pure data: no process is started and no packet sent here.

The run's configuration (config), who plays which role, holds which segments and data and
talks to whom (runplan, chains), and what a round should cost (latency, mobility, resources:
the analytic model and the resource manager built on it). It reads topologies and link
parameters from testbed.emu; it never builds a network or starts a node.
"""
