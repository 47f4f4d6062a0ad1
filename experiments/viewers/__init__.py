"""Looking at a trace: a tidy table, TensorBoard event files (:mod:`.export`) and a per-layer
dashboard figure (:mod:`.dashboard`), for a run directory or a trace file from one's own loop."""
