"""The device's federation side: the long-lived worker, the round's handlers, one device's
round, its owner's policy, its privacy ledger, the SecAgg+ gate, the local-only baseline and
the model a process serves devices with."""
