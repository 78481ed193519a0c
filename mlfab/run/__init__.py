"""How a run is set up and carried out (internal): run directory, Trainer settings, callbacks, provenance, Slurm,
ranks, and the pipeline every command runs."""
