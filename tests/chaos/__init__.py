"""The chaos run: the whole system (3 agents, mosquitto, 2 coordinators on PostgreSQL) under a
seeded schedule of mixed faults, with its invariants checked while it runs and at the end.

Modules: `schedule` (pure: seed + length -> faults), `rig` (the real processes, the network
namespace, the tmpfs), `faults` (one injector per fault kind), `load` (results, commands),
`invariants` (pure checks over store rows and health samples), `report` (the table),
`run` (the run itself; `python -m tests.chaos.run --seconds 1800 --seed N`).
"""
