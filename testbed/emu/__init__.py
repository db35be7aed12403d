"""emu: the emulated network, and nothing about learning.

What a link is (linkmodel), how it is made real (links: TCLink/netem where the kernel has it,
a user-space relay where it does not; linkops: changed while a run goes), the Mininet network
and its hosts (network, loopback for runs without one), routes (routing), what the kernel
offers (capabilities), whether links keep their promise (linkcheck), topology scripts
(topolib, topology) and the /tmp paths a controller owns (owned). It knows no scheme, model,
round or run; it imports nothing of sledge but testbed.errors.
"""
