"""nac-qmp-guard: a QMP proxy that asks NAC before QEMU starts or changes a block operation."""
