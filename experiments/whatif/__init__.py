"""What-if and diagnose: predictions of a change (lr, momentum, method) before it is made,
checked against forked runs (:mod:`.predict`, :mod:`.check`), and a per-layer diagnosis of a
run (:mod:`.diagnose`)."""
