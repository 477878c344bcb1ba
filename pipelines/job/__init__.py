"""The audit job's phases: plan, graph, execute, verify, publish, manifest, dry run, preflight, incremental work."""
