"""cmoe's benchmarks: run each from the repository root as `python -m bench.NAME` (`make bench` runs the main ones).
Every script writes its rows to bench/results/ with the machine, command, date and commit
(`cmoe.tools.provenance`); BENCHMARKS.md summarises them by question."""
