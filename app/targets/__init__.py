"""mailcow targets: their live policy maps (ownership, drift) and the worker's per-target bookkeeping."""
